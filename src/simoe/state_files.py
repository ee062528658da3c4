"""Named tensors to and from safetensors files: written atomically, read back with checked keys and shapes.

SIMoE models, SMEAR baselines and the trainer's λ keep only their own tensors beside a frozen base;
these two functions are how all of them persist.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


@torch.no_grad()
def load_state_into(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy the tensors saved at ``path`` into ``state``'s tensors (in place), refusing any mismatch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    loaded = load_file(path)
    missing, unexpected = sorted(state.keys() - loaded.keys()), sorted(loaded.keys() - state.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved from another base?")
    for key, tensor in state.items():
        if tensor.shape != loaded[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(loaded[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
        tensor.copy_(loaded[key])


def save_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON through a temporary file (atomic, like :func:`save_state`)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; bad JSON is reported with the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
