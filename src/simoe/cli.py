"""The ``simoe`` command line: a thin layer over the library, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from simoe.recipes.train import run_train
from simoe.training.arguments import add_config_arguments, config_from_args, parse_train_args


def inspect(args: argparse.Namespace) -> None:
    """Upcycle a model (without training) and print what SIMoE targets and what it costs."""
    import torch
    from transformers import AutoModelForCausalLM

    from simoe.model import upcycle

    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    base_params = sum(p.numel() for p in base.parameters())
    model = upcycle(base, config_from_args(args))
    kinds = Counter(name.split(".")[-1] for name, _ in model.routed_layers())
    groups = {k: sum(p.numel() for p in v) for k, v in model.parameter_groups().items()}
    report = {
        "base_model": args.model_name_or_path,
        "base_params": base_params,
        "upcycled_modules_by_name": dict(sorted(kinds.items())),
        "trainable_params": groups,
        "config": model.simoe_config.to_dict(),
        "sparsity": model.sparsity_report(),
    }
    print(json.dumps(report, indent=2))


def train(argv: list[str]) -> None:
    """Upcycle a model with SIMoE and instruction-tune it (see `simoe train --help`)."""
    run_train(*parse_train_args(argv))


def generate(args: argparse.Namespace) -> None:
    """Generate responses from a SIMoE checkpoint, a compact or merged export, or any causal LM."""
    from transformers import set_seed

    from simoe.data import render_prompt
    from simoe.inference.generation import generate_from_ids
    from simoe.inference.loading import load_prompts
    from simoe.inference.routing import resolve_routing
    from simoe.io import save_text

    prompts = [([{"role": "user", "content": text}], f"--prompt {i + 1}")
               for i, text in enumerate(args.prompt)]
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.jsonl")
    model, tokenizer = _load(args, "checkpoint")
    routing = resolve_routing(model, tokenizer, args.routing, args.batch_size) if args.routing else None
    if args.seed is not None:
        set_seed(args.seed)
    options = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "num_beams")
               if getattr(args, k) is not None}  # unset: the model's generation_config decides
    results = generate_from_ids(
        model, tokenizer, [render_prompt(tokenizer, messages) for messages, _ in prompts], routing=routing,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, **options,
    )
    lines = []
    for (messages, origin), out in zip(prompts, results, strict=True):
        record = {"prompt": messages[-1]["content"], "response": out["response"], "origin": origin}
        if out["routing"] is not None:
            record["routing"] = out["routing"]
        lines.append(json.dumps(record, ensure_ascii=False))
    print("\n".join(lines))
    if args.output:
        save_text("\n".join(lines) + "\n", args.output)


def export(args: argparse.Namespace) -> None:
    """Export a SIMoE checkpoint: compact (SIMoE inference) or merged under a fixed routing (plain HF)."""
    from simoe.inference.export import save_compact, save_merged
    from simoe.inference.routing import resolve_routing
    from simoe.model import SIMoEModel

    if args.mode == "merged" and not args.routing:
        raise ValueError("--mode merged needs --routing expert:K, weights:w1,...,wM or dataset:FILE")
    if args.mode == "compact" and args.routing:
        raise ValueError("--routing is for --mode merged; a compact export keeps the router")
    model, tokenizer = _load(args, "checkpoint")
    if not isinstance(model, SIMoEModel):
        raise ValueError(f"{args.checkpoint} is not a SIMoE checkpoint or compact export "
                         "(no simoe_config.json)")
    if args.mode == "compact":
        report = save_compact(model, args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(json.dumps(report, indent=2))
        return
    routing = resolve_routing(model, tokenizer, args.routing, args.batch_size, args.data_format)
    save_merged(model, routing, args.output_dir, tokenizer=tokenizer)
    print(json.dumps({"output_dir": args.output_dir, "routing": routing.tolist()}, indent=2))


def eval_sni(args: argparse.Namespace) -> None:
    """Super-NaturalInstructions: ROUGE-L and exact match, per task and category (official protocol)."""
    from simoe.evaluation.sni import evaluate_sni

    model, tokenizer = _load(args, "model")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    summary = evaluate_sni(model, tokenizer, args.data, args.output_dir, split=args.split,
                           max_instances=args.max_instances, tasks=tasks,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps(summary, indent=2))


def eval_perplexity(args: argparse.Namespace) -> None:
    """Perplexity of the response tokens of any training data, token-weighted."""
    from simoe.evaluation.perplexity import evaluate_perplexity

    model, tokenizer = _load(args, "model")
    summary = evaluate_perplexity(
        model, tokenizer, args.data, args.output_dir, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, data_format=args.data_format, split=args.split,
        max_instances_per_task=args.max_instances_per_task, prompt_field=args.prompt_field,
        response_field=args.response_field,
    )
    print(json.dumps(summary, indent=2))


def eval_lm_eval(args: argparse.Namespace) -> None:
    """EleutherAI lm-evaluation-harness tasks on a SIMoE checkpoint (needs lm-eval)."""
    from simoe.extras import require

    require("lm_eval", "simoe eval lm-eval")
    from simoe.evaluation.lm_eval import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    results = evaluate(args.checkpoint, tasks, args.output_dir, batch_size=args.batch_size, limit=args.limit,
                       include_path=args.include_path, num_fewshot=args.num_fewshot)
    print(json.dumps(results, indent=2, default=str))


def analyze(args: argparse.Namespace) -> None:
    """The paper's analyses of a SIMoE checkpoint: routing per task (with a dendrogram), expert overlap,
    non-zero share by layer depth and module type (PNG + JSON)."""
    from simoe.analysis.report import analyze as run_analyses
    from simoe.data import load_records
    from simoe.model import SIMoEModel

    model, tokenizer = _load(args, "checkpoint")
    if not isinstance(model, SIMoEModel):
        raise ValueError(f"{args.checkpoint} is not a SIMoE checkpoint or compact export")
    records = load_records(args.data, data_format=args.data_format, split=args.split,
                           max_instances_per_task=args.max_instances_per_task)
    result = run_analyses(model, tokenizer, records, args.output_dir, batch_size=args.batch_size)
    print(json.dumps({"summary": result["summary"], "files": result["files"]}, indent=2, default=str))


def compare(args: argparse.Namespace) -> None:
    """The side-by-side study: base, full, LoRA, sparse upcycling, SMEAR and SIMoE trained alike, scored
    with `simoe eval sni`; one record per run (resumable across sessions), a chart and a Markdown table
    with 95 % bootstrap intervals."""
    from simoe.recipes.compare import run_compare

    rows = run_compare(args.config, args.runs, table_only=args.table_only)
    for r in rows:
        lo, hi = r["rougeL_ci95"]
        print(f"{r['run']:24s} ROUGE-L {r['rougeL']:6.2f} [{lo:.2f}, {hi:.2f}]")


MODEL_HELP = "SIMoE checkpoint or compact export directory, HF model directory, hub id or built-in name"


def _load(args: argparse.Namespace, name: str):
    """(model, tokenizer) from ``args.<name>`` on ``--device`` (default: cuda when available)."""
    import torch

    from simoe.inference.loading import load_for_inference

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_for_inference(getattr(args, name), args.dtype, device)


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype of the base weights (default: transformers' default)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompts_file", help="JSON Lines: records of a training format, or {\"prompt\": ...}; "
                   "a final assistant turn is dropped")
    p.add_argument("--routing", help="fixed routing instead of the router's: expert:K (0-based), "
                   "weights:w1,...,wM or dataset:FILE (mean routing of its prompts); SIMoE models only")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--num_beams", type=int)
    p.add_argument("--seed", type=int, help="seed of the sampling")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output", help="also write the JSON lines to this file")
    _add_loading(p)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="SIMoE checkpoint (or compact export) directory")
    p.add_argument("--mode", required=True, choices=["merged", "compact"])
    p.add_argument("--routing", help="merged: expert:K (0-based), weights:w1,...,wM (normalised to sum 1) "
                   "or dataset:FILE (mean routing of the file's prompts)")
    p.add_argument("--data_format", help="format of the dataset:FILE records (detected when omitted)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts routed at once for dataset:FILE")
    p.add_argument("--output_dir", required=True)
    _add_loading(p)


def _eval_sni_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--data", required=True,
                   help="SNI directory (tasks/*.json, splits/{train,test}_tasks.txt)")
    s.add_argument("--split", default="test", choices=["test", "train"])
    s.add_argument("--max_instances", type=int, help="first N instances of each task")
    s.add_argument("--tasks", help="comma-separated task names to keep")
    s.add_argument("--max_new_tokens", type=int, default=128)
    s.add_argument("--batch_size", type=int, default=8)
    s.add_argument("--output_dir", required=True)
    _add_loading(s)


def _eval_perplexity_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--data", required=True, help="any training data source (file, SNI directory, HF dataset)")
    s.add_argument("--data_format", help="alpaca, chat, prompt_completion or sni (detected when omitted)")
    s.add_argument("--split")
    s.add_argument("--max_seq_length", type=int, help="default: the model's context length")
    s.add_argument("--max_instances_per_task", type=int)
    s.add_argument("--prompt_field")
    s.add_argument("--response_field")
    s.add_argument("--batch_size", type=int, default=4)
    s.add_argument("--output_dir", required=True)
    _add_loading(s)


def _eval_lm_eval_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--output_dir", required=True)
    s.add_argument("--limit", type=int)
    s.add_argument("--include_path", help="directory of extra lm-eval task YAMLs")
    s.add_argument("--num_fewshot", type=int)
    s.add_argument("--batch_size", type=int, default=8)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="SIMoE checkpoint or compact export directory")
    p.add_argument("--data", required=True, help="records with a task group (e.g. an SNI directory)")
    p.add_argument("--data_format", default=None, help="alpaca, chat, prompt_completion or sni (detected)")
    p.add_argument("--split", default=None, help="SNI: train or test tasks")
    p.add_argument("--max_instances_per_task", type=int, default=20,
                   help="prompts per task used for the mean routing (default 20)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output_dir", required=True)
    _add_loading(p)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_name_or_path", help="Hugging Face hub id or local directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_config_arguments(p)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML study config, e.g. configs/compare_smollm2_sni.yaml")
    p.add_argument("--runs", nargs="+", help="do only these runs now (e.g. base simoe-seed0); default: every "
                   "run without a record")
    p.add_argument("--table_only", action="store_true", help="run nothing: rebuild the table and chart "
                   "from the records there are")


# Sub-command -> (the function that runs it, the function that declares its flags). `train` parses its
# own flags (HfArgumentParser: TrainingArguments has ~100 options); "eval X" is `simoe eval X`.
COMMANDS = {
    "train": (train, None),
    "inspect": (inspect, _inspect_args),
    "generate": (generate, _generate_args),
    "export": (export, _export_args),
    "eval sni": (eval_sni, _eval_sni_args),
    "eval perplexity": (eval_perplexity, _eval_perplexity_args),
    "eval lm-eval": (eval_lm_eval, _eval_lm_eval_args),
    "analyze": (analyze, _analyze_args),
    "compare": (compare, _compare_args),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``simoe`` parser, built from :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="simoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (job, declare) in COMMANDS.items():
        doc = job.__doc__.replace("%", "%%")  # argparse formats help with %
        if declare is None:
            commands.add_parser(name, help=doc, add_help=False)
            continue
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                members = ", ".join(n.split(" ", 1)[1] for n in COMMANDS if n.startswith(group + " "))
                groups[group] = commands.add_parser(group, help=f"{group}: {members}").add_subparsers(
                    dest=f"{group}_command", required=True)
            p = groups[group].add_parser(leaf, help=doc, description=doc)
        else:
            p = commands.add_parser(name, help=doc, description=doc)
        declare(p)
        p.set_defaults(job=job, name=name)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return _run("train", lambda: train(argv[1:]))
    args = build_parser().parse_args(argv)
    _run(args.name, lambda: args.job(args))


def _run(command: str, job) -> None:
    try:
        job()
    except (ValueError, FileNotFoundError, OSError, ImportError, RuntimeError) as e:
        print(f"simoe {command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
