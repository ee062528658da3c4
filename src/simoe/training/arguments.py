"""The options of ``simoe train``, parsed once: YAML + ``--key value`` → four dataclasses.

One dataclass per concern, parsed as TRL does: ``ModelArguments``, ``DataArguments``,
:class:`SIMoEConfig` (the method; :class:`BaselineConfig` for the baselines) and
:class:`SIMoETrainingArguments` (``TrainingArguments`` plus SIMoE's learning rates). A ``--config``
YAML file sets defaults; command-line flags win; an option that does not apply to the chosen
``--method`` is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, TrainingArguments

from simoe.baselines import METHODS, BaselineConfig
from simoe.config import RECORDED_FIELDS, SIMoEConfig


@dataclass
class SIMoETrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the learning rates and schedules SIMoE adds.

    ``learning_rate`` is Δ's (it plays the role of full fine-tuning's learning rate).
    """

    mask_learning_rate: float = field(
        default=0.05,
        metadata={"help": "Learning rate of the hard-concrete mask logits log α (much larger than Δ's)."},
    )
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the router; default: learning_rate."}
    )
    lagrangian_learning_rate: float = field(
        default=0.1, metadata={"help": "Learning rate of the Lagrange multipliers λ (gradient ascent)."}
    )
    constant_mask_learning_rate: bool = field(
        default=True,
        metadata={
            "help": "Keep the learning rates of the mask logits and λ constant (as CoFi pruning does), "
            "so the sparsity controller can still correct the density at the end of training; false: "
            "they follow lr_scheduler_type like Δ's."
        },
    )
    sparsity_warmup_steps: float = field(
        default=0.3,
        metadata={
            "help": "Steps over which the target density falls linearly from 1.0 to 1 - target_sparsity; "
            "a value below 1 is a fraction of the total training steps."
        },
    )
    compact_after_warmup: bool = field(
        default=False,
        metadata={
            "help": "After the sparsity warm-up, at the first step that meets the density target, drop "
            "the input columns every expert gates off from Δ, the mask logits and the optimizer state "
            "(they stay off): memory and the optimizer's work fall to about the union density. "
            "Noise-free gates, one process."
        },
    )


# The methods each SIMoETrainingArguments option of its own applies to (`simoe train` rejects the
# others; HfArgumentParser hands field metadata to argparse, so it cannot carry this).
TRAINING_OPTION_METHODS = {
    "mask_learning_rate": ("simoe",),
    "router_learning_rate": ("simoe", "smear"),
    "lagrangian_learning_rate": ("simoe",),
    "constant_mask_learning_rate": ("simoe",),
    "sparsity_warmup_steps": ("simoe",),
    "compact_after_warmup": ("simoe",),
}


@dataclass
class ModelArguments:
    method: str = field(
        default="simoe",
        metadata={"help": "simoe, or a baseline trained the same way: full, lora, sparse-upcycling, smear.",
                  "choices": list(METHODS)},
    )
    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Hugging Face hub id, local directory, or a built-in offline name "
                  "(smollm2-135m-instruct, gemma3-270m)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the frozen base: float32, bfloat16, float16 or auto "
                  "(SIMoE's trainable tensors stay float32).",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation (eager, sdpa, flash_attention_2)."}
    )


@dataclass
class DataArguments:
    data: str | None = field(
        default=None,
        metadata={"help": "Training data: a JSON/JSONL/CSV/Parquet file, a Super-NaturalInstructions "
                  "directory, a Hugging Face dataset name, or simoe:synthetic (the demo's task families)."},
    )
    data_format: str | None = field(
        default=None,
        metadata={"help": "alpaca, chat, prompt_completion or sni; detected from the fields when omitted."},
    )
    split: str | None = field(
        default=None, metadata={"help": "SNI: train or test task split; HF datasets: the split name."}
    )
    max_seq_length: int = field(
        default=1024, metadata={"help": "Longest tokenized example; prompts are cut first, from the left."}
    )
    max_instances_per_task: int | None = field(
        default=None, metadata={"help": "SNI: keep at most this many instances per task."}
    )
    prompt_field: str | None = field(
        default=None,
        metadata={"help": "Column holding the prompt, for files in no known format (e.g. question)."},
    )
    response_field: str | None = field(
        default=None, metadata={"help": "Column holding the response, with prompt_field (e.g. answer)."}
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed records with a counted warning instead of failing."}
    )


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = SIMoEConfig) -> None:
    """One ``--field`` per field of ``cls`` (SIMoEConfig or BaselineConfig), with its help text."""
    title = "SIMoE options (SIMoEConfig)" if cls is SIMoEConfig else "baseline options (BaselineConfig)"
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in RECORDED_FIELDS:  # set from the base model and tokenizer, never by hand
            continue
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if f.name == "target_modules":
            group.add_argument("--target_modules", nargs="+", default=None, help=help_text)
        elif f.type in ("bool", bool):
            group.add_argument(f"--{f.name}", type=_parse_bool, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            group.add_argument(f"--{f.name}", type=kind, default=None, help=help_text,
                               choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls: type = SIMoEConfig):
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, SIMoETrainingArguments),
        prog="simoe train",
        description="Upcycle a causal LM with SIMoE and instruction-tune it (transformers.Trainer).",
    )
    parser.add_argument("--config", default=None, help="YAML file of defaults for any option below.")
    add_config_arguments(parser, SIMoEConfig)
    add_config_arguments(parser, BaselineConfig)
    return parser


def parse_train_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SIMoEConfig | BaselineConfig, SIMoETrainingArguments]:
    """Parse ``--config FILE`` (YAML defaults) and ``--key value`` overrides into four dataclasses.

    The third is the method's options: a SIMoEConfig for ``--method simoe``, else a BaselineConfig.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = load_yaml_defaults(known.config, parser) if known.config else {}
    parser.set_defaults(**defaults)
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    given = {token[2:].split("=")[0] for token in argv if token.startswith("--")}
    check_options_apply(model_args.method, {f"--{name}" for name in given}, source="command line")
    if known.config:
        check_options_apply(model_args.method, set(defaults), source=known.config)
    cls = SIMoEConfig if model_args.method == "simoe" else BaselineConfig
    return model_args, data_args, config_from_args(rest, cls), training_args


def option_methods(name: str) -> tuple[str, ...] | None:
    """The methods a `simoe train` option applies to, or None when it applies to every method."""
    if name in {f.name for f in dataclasses.fields(SIMoEConfig)}:
        return ("simoe",)
    baseline = {f.name: f.metadata.get("methods") for f in dataclasses.fields(BaselineConfig)}
    return baseline.get(name) or TRAINING_OPTION_METHODS.get(name)


def check_options_apply(method: str, options: set[str], source: str) -> None:
    """Raise naming every option in ``options`` (``--name`` or YAML keys) that ``method`` ignores."""
    wrong = {o: option_methods(o.lstrip("-")) for o in sorted(options)}
    wrong = {o: m for o, m in wrong.items() if m is not None and method not in m}
    if wrong:
        raise ValueError(f"{source}: option(s) that do not apply to --method {method}: "
                         + "; ".join(f"{o} (applies to {', '.join(m)})" for o, m in wrong.items()))


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; see `simoe train --help`")
    return values
