"""Inference with whatever ``simoe`` wrote or loads: checkpoints, compact exports, plain HF models.

:func:`load_for_inference` tells the three apart by their files; :func:`generate_from_ids` is batched
generation from token-id prompts that, for a SIMoE model, routes each prompt once (or uses a fixed
routing) and returns the routing it used. The ``simoe generate`` and ``simoe export`` commands and
:mod:`simoe.evaluation` are built on these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from simoe.baselines.smear import CONFIG_NAME as SMEAR_CONFIG_NAME
from simoe.baselines.smear import SMEARModel
from simoe.config import CONFIG_NAME, WEIGHTS_NAME, SIMoEConfig
from simoe.data import check_messages, detect_format, load_records, normalize_record, render_prompt
from simoe.export import COMPACT_WEIGHTS_NAME, load_compact, mean_routing, parse_routing
from simoe.generation import _eos_ids, eval_mode, pad_left
from simoe.hub import load_model_and_tokenizer
from simoe.model import SIMoEModel

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# The response field of each record format; a prompt-only record gets a placeholder there (see load_prompts).
_RESPONSE_FIELDS = {"alpaca": "output", "prompt_completion": "completion"}


# ---------------------------------------------------------------------------- loading
def load_for_inference(
    model: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a SIMoE checkpoint, a compact export or any HF model.

    * a directory with ``simoe_config.json`` and ``simoe_model.safetensors`` (a ``simoe train`` output
      or one of its checkpoints): the recorded base (``base_model_name_or_path``) upcycled with the saved
      SIMoE tensors, a :class:`SIMoEModel`;
    * a directory with ``simoe_config.json`` and ``simoe_compact.safetensors``: a compact export
      (:func:`simoe.export.load_compact`), also a :class:`SIMoEModel`;
    * anything else (a hub id, a local HF directory such as a merged export, a built-in name):
      :func:`simoe.hub.load_model_and_tokenizer`.

    The tokenizer of a SIMoE directory is its own when it holds one, else the base's.
    """
    path = Path(model).expanduser()
    if (path / SMEAR_CONFIG_NAME).is_file():  # a SMEAR baseline (simoe train --method smear)
        loaded = SMEARModel.from_pretrained(path, dtype=dtype)
        tokenizer = _tokenizer(path, loaded.options.base_model_name_or_path)
    elif (path / "adapter_config.json").is_file():  # a LoRA baseline: PEFT adapter, merged for inference
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
        base, _ = load_model_and_tokenizer(base_name, dtype=dtype)
        loaded = PeftModel.from_pretrained(base, path).merge_and_unload()
        tokenizer = _tokenizer(path, base_name)
    elif not (path / CONFIG_NAME).is_file():  # full / sparse-upcycling outputs, merged exports, any HF model
        loaded, tokenizer = load_model_and_tokenizer(os.fspath(model), dtype=dtype)
    else:
        config = SIMoEConfig.from_pretrained(path)
        if not config.base_model_name_or_path:
            raise ValueError(f"{path / CONFIG_NAME}: no base_model_name_or_path recorded")
        base, tokenizer = load_model_and_tokenizer(config.base_model_name_or_path, dtype=dtype)
        if (path / WEIGHTS_NAME).is_file():
            loaded = SIMoEModel.from_pretrained(base, path)
        elif (path / COMPACT_WEIGHTS_NAME).is_file():
            loaded = load_compact(base, path)
        else:
            raise FileNotFoundError(f"{path}: has {CONFIG_NAME} but neither {WEIGHTS_NAME} (a checkpoint) "
                                    f"nor {COMPACT_WEIGHTS_NAME} (a compact export)")
        if any((path / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path)
    if device is not None:
        loaded.to(device)
    return loaded.eval(), tokenizer


def _tokenizer(path: Path, base_name: str) -> PreTrainedTokenizerBase:
    """The directory's own tokenizer (training saves it), else the base's."""
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path)
    return load_model_and_tokenizer(base_name)[1]


# ---------------------------------------------------------------------------- prompts
def first_prompt(messages: list[dict]) -> list[dict]:
    """The messages before the first assistant turn: what training routes on (``prompt_mask``)."""
    end = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:end]


def load_prompts(path: str | os.PathLike) -> list[tuple[list[dict], str]]:
    """(prompt messages, origin) of every line of a JSON Lines file.

    A line is a record of any training format (chat, alpaca, prompt/completion; see
    :func:`simoe.data.load_records`), with or without its response, or ``{"prompt": "..."}``. The
    final assistant turn, if present, is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{path}:line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{origin}: invalid JSON line: {e.msg}") from None
        data_format = detect_format(record, origin)
        # A prompt-only record gets a placeholder response, so the format's own normalisation
        # (alpaca's instruction + input, system prompts) applies; the placeholder is dropped below.
        if data_format == "chat":
            messages = record["messages"]
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                    and messages[-1].get("role") != "assistant":
                record = {**record, "messages": [*messages, {"role": "assistant", "content": "-"}]}
        elif record.get(_RESPONSE_FIELDS[data_format]) is None:
            record = {**record, _RESPONSE_FIELDS[data_format]: "-"}
        messages = normalize_record(record, data_format, origin)["messages"][:-1]
        check_messages([*messages, {"role": "assistant", "content": ""}], origin)
        prompts.append((messages, origin))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _batches(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[dict]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[start:start + batch_size], pad_id)
        # Every token of a rendered prompt is a prompt token: the router reads all unpadded ones.
        yield {"input_ids": ids, "attention_mask": mask, "prompt_mask": mask}


def _pad_id(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has no pad token and neither it nor the model has an eos token")
    return eos[0]


# ---------------------------------------------------------------------------- routing
def resolve_routing(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: str, batch_size: int = 16,
    data_format: str | None = None,
) -> torch.Tensor:
    """The fixed routing [M] that ``spec`` names: ``expert:K``, ``weights:w1,...,wM`` or ``dataset:FILE``.

    ``dataset:FILE``: the mean router coefficients over the file's records (any format that
    :func:`simoe.data.load_records` reads), each routed on its prompt before the first response,
    rendered as training renders it, so the routing is the one training and generation computed.
    """
    if not isinstance(model, SIMoEModel):
        raise ValueError(f"routing {spec!r} needs a SIMoE model (a checkpoint or a compact export); this is "
                         f"a plain {type(model).__name__} (a merged export has its routing built in)")
    routing = parse_routing(spec, model.simoe_config.num_experts)
    if isinstance(routing, torch.Tensor):
        return routing
    records = load_records(routing, data_format=data_format)
    prompts = [render_prompt(tokenizer, first_prompt(r["messages"])) for r in records]
    return mean_routing(model, _batches(prompts, batch_size, _pad_id(model, tokenizer)))


# ---------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_from_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    routing: torch.Tensor | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    **generate_kwargs,
) -> list[dict]:
    """``{"response": str, "routing": [M floats] | None}`` for every token-id prompt.

    Prompts are left-padded in batches of ``batch_size`` and decoded greedily unless
    ``generate_kwargs`` say otherwise (``do_sample``, ``temperature``, ``num_beams``...); generation stops
    at the tokenizer's and the model's eos tokens, and only the new tokens are decoded (without special
    tokens, stripped), as :func:`simoe.generation.generate` does. A SIMoE model routes each prompt once
    (the routing is returned), or uses ``routing`` [M] for every prompt; a plain model takes no routing.
    """
    simoe = isinstance(model, SIMoEModel)
    if routing is not None and not simoe:
        raise ValueError(f"a fixed routing needs a SIMoE model, not a plain {type(model).__name__}")
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("neither the tokenizer nor the model's generation_config has an eos token")
    pad_id = _pad_id(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
    kwargs.update(generate_kwargs)
    device = next(model.parameters()).device
    results = []
    with eval_mode(model):
        for batch in _batches(prompts, batch_size, pad_id):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            r = None
            if simoe:  # what SIMoEModel.generate does, made explicit so the routing can be reported
                r = model.route(ids, mask) if routing is None else routing.to(device).expand(len(ids), -1)
                out = model.generate(input_ids=ids, attention_mask=mask, routing=r, **kwargs)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in enumerate(texts):
                results.append({"response": text.strip(), "routing": None if r is None else r[i].tolist()})
    return results


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings``), if it says."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)
