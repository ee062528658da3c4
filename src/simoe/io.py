"""Every file the project writes, written atomically; JSON, JSON Lines and safetensors read back checked.

A write goes to ``<path>.tmp`` and is renamed over ``path`` only once complete, so a crash never
leaves a half-written file and a failed write leaves the previous file as it was (the ``.tmp`` is
removed). SIMoE models, SMEAR baselines and the trainer's λ keep only their own tensors beside a
frozen base: :func:`save_state` and :func:`load_state_into` are how all of them persist.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write ``path``'s new content to: renamed over ``path`` when the block
    completes, removed when it raises."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------- writes
def save_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(data: Any, path: str | os.PathLike, *, default: Callable[[Any], Any] | None = None,
              ensure_ascii: bool = True) -> None:
    """Write ``data`` as indented JSON with a final newline, atomically (``default`` and
    ``ensure_ascii`` as in :func:`json.dumps`)."""
    save_text(json.dumps(data, indent=2, default=default, ensure_ascii=ensure_ascii) + "\n", path)


def save_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write ``records`` as JSON Lines (one object a line, non-ASCII kept as UTF-8), atomically."""
    save_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), path)


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> None:
    """Write the named tensors ``state`` to a safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"} if metadata is None else metadata)


# ---------------------------------------------------------------------------- checked reads
def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a missing, truncated or damaged file is an error
    naming it (not safetensors' own)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from None


@torch.no_grad()
def load_state_into(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy the tensors saved at ``path`` into ``state``'s tensors (in place), refusing any mismatch;
    a sharded tensor (FSDP2 DTensor) gets its shard of the saved whole one."""
    loaded = read_state(path)
    missing, unexpected = sorted(state.keys() - loaded.keys()), sorted(loaded.keys() - state.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved from another base?")
    for key, tensor in state.items():
        if tensor.shape != loaded[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(loaded[key].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
        tensor.copy_(_as_held_by(tensor, loaded[key]))


def _as_held_by(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) in the form ``target`` has: for an FSDP2-sharded DTensor, this rank's
    shard of it (no communication: every rank read the whole file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                             src_data_rank=None)


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


def iter_jsonl(path: str | os.PathLike, fields: Sequence[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a JSON Lines file, checked as
    :func:`read_jsonl` checks them."""
    with open(path, encoding="utf-8") as f:
        # Lines end at \n (or \r): str.splitlines would also split at U+2028 and others, which
        # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: invalid JSON line: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:line {n}: expected a JSON object, got {type(record).__name__}")
            missing = [field for field in fields or () if field not in record]
            if missing:
                raise ValueError(f"{path}:line {n}: field {missing[0]!r} is missing")
            yield n, record


def read_jsonl(path: str | os.PathLike, fields: Sequence[str] | None = None) -> list[dict]:
    """The records of a JSON Lines file (blank lines skipped). A line that is not valid JSON, not
    an object, or lacks one of ``fields`` raises ValueError naming ``path:line N``."""
    return [record for _, record in iter_jsonl(path, fields)]
