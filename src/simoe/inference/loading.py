"""Loading whatever ``simoe`` wrote or reads: checkpoints, compact exports, SMEAR, plain HF models,
and prompt files.

:func:`load_for_inference` tells them apart by their files. The ``simoe generate``, ``simoe export``
and ``simoe eval`` commands are built on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from simoe.baselines.smear import CONFIG_NAME as SMEAR_CONFIG_NAME
from simoe.baselines.smear import SMEARModel
from simoe.config import CONFIG_NAME, WEIGHTS_NAME, SIMoEConfig
from simoe.data import check_messages, detect_format, normalize_record
from simoe.extras import require
from simoe.hub import load_model_and_tokenizer
from simoe.inference.export import COMPACT_WEIGHTS_NAME, load_compact
from simoe.io import iter_jsonl
from simoe.model import SIMoEModel

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


# The response field of each record format; a prompt-only record gets a placeholder there (see load_prompts).
_RESPONSE_FIELDS = {"alpaca": "output", "prompt_completion": "completion"}


def load_for_inference(
    model: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a SIMoE checkpoint, a compact export or any HF model.

    * a directory with ``simoe_config.json`` and ``simoe_model.safetensors`` (a ``simoe train`` output
      or one of its checkpoints): the recorded base (``base_model_name_or_path``) upcycled with the saved
      SIMoE tensors, a :class:`SIMoEModel`;
    * a directory with ``simoe_config.json`` and ``simoe_compact.safetensors``: a compact export
      (:func:`simoe.inference.export.load_compact`), also a :class:`SIMoEModel`;
    * anything else (a hub id, a local HF directory such as a merged export, a built-in name):
      :func:`simoe.hub.load_model_and_tokenizer`.

    The tokenizer of a SIMoE directory is its own when it holds one, else the base's.
    """
    path = Path(model).expanduser()
    if (path / SMEAR_CONFIG_NAME).is_file():  # a SMEAR baseline (simoe train --method smear)
        loaded = SMEARModel.from_pretrained(path, dtype=dtype)
        tokenizer = _tokenizer(path, loaded.options.base_model_name_or_path)
    elif (path / "adapter_config.json").is_file():  # a LoRA baseline: PEFT adapter, merged for inference
        peft = require("peft", f"{path} (a LoRA adapter)")
        base_name = peft.PeftConfig.from_pretrained(path).base_model_name_or_path
        base, _ = load_model_and_tokenizer(base_name, dtype=dtype)
        loaded = peft.PeftModel.from_pretrained(base, path).merge_and_unload()
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
    for n, record in iter_jsonl(path):
        origin = f"{path}:line {n}"
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

