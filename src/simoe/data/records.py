"""Instruction records: read files, SNI task directories or the Hub into one normalised form.

Every source becomes a list of *normalised records*::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
     "group": str | None,      # task / dataset name, for per-task analyses (see GROUP_FIELDS)
     "origin": str}            # "<file>:line N" (JSON Lines, CSV) or "<file>:index i" (else), for errors

A conversation is an optional system message, then user and assistant turns alternating, starting with a
user turn and ending with an assistant turn.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import datasets

from simoe.data.sni import load_sni_tasks, sni_records

FORMATS = ("alpaca", "chat", "prompt_completion", "sni")


ROLES = ("system", "user", "assistant")


# The first of these fields that a record has (a non-empty string) becomes its group: SNI-style task
# names, then categories, then the dataset of origin (the Tülu-3 SFT mixture's "source").
GROUP_FIELDS = ("task", "category", "source")


SYNTHETIC = "simoe:synthetic"


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def detect_format(record: object, origin: str, prompt_field: str | None = None) -> str:
    """The format of a source, from its first record's fields: ``chat`` (``messages``), ``alpaca``
    (``instruction``) or ``prompt_completion`` (``prompt``, or ``prompt_field``)."""
    if not isinstance(record, dict):
        raise ValueError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if (prompt_field or "prompt") in record:
        return "prompt_completion"
    raise ValueError(
        f"{origin}: cannot tell the data format from the fields {sorted(record)}; expected 'messages' "
        "(chat), 'instruction' + 'output' (alpaca) or 'prompt' + 'completion'; pass data_format, or "
        "prompt_field/response_field to name the prompt and response columns"
    )


def _text(record: dict, field: str, origin: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if field not in record:
        raise ValueError(f"{origin}: field {field!r} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{origin}: field {field!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{origin}: field {field!r} is empty")
    return value


def check_messages(messages: object, origin: str) -> None:
    """Raise ValueError unless ``messages`` is [system?], user, assistant, user, assistant, ..."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{origin}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{origin}: field 'messages'[{i}] must be {{'role': one of {ROLES}, "
                             f"'content': str}}, got {m!r:.200}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + len(messages) - len(turns)
            raise ValueError(f"{origin}: field 'messages'[{at}] has role {m['role']!r}, expected "
                             f"{expected!r} (an optional system message, then user and assistant turns "
                             "alternating)")
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError(f"{origin}: field 'messages' must end with an assistant turn")


def normalize_record(
    record: object, data_format: str, origin: str,
    prompt_field: str | None = None, response_field: str | None = None,
) -> dict:
    """One raw record of ``data_format`` as a normalized record (see the module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    if data_format == "chat":
        messages = record.get("messages")
        check_messages(messages, origin)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        for i, m in enumerate(messages):
            if m["role"] != "system" and not m["content"].strip():
                raise ValueError(f"{origin}: field 'messages'[{i}] ({m['role']}) has empty content")
    elif data_format == "alpaca":
        # Alpaca's optional input follows the instruction after a blank line (one user turn).
        user = _text(record, "instruction", origin)
        extra = _text(record, "input", origin, required=False)
        user = f"{user}\n\n{extra}" if extra.strip() else user
        system = _text(record, "system", origin, required=False)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _text(record, "output", origin)}]
    elif data_format == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, prompt_field or "prompt", origin)},
                    {"role": "assistant", "content": _text(record, response_field or "completion", origin)}]
    else:
        raise ValueError(f"{origin}: data_format must be one of {FORMATS[:3]} for a record, "
                         f"got {data_format!r}")
    group = next((record[f] for f in GROUP_FIELDS if isinstance(record.get(f), str) and record[f]), None)
    return {"messages": messages, "group": group, "origin": origin}


def _read_json(path: Path) -> list[tuple[object, str]]:
    """(raw record, origin) of a JSON array file or a JSON Lines file (whatever its suffix).

    A JSON Lines line that does not parse becomes a ValueError in place of its record: a bad record,
    which ``skip_bad_records`` may skip. A JSON array that does not parse is a bad file.
    """
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:line {e.lineno}: invalid JSON: {e.msg}") from e
        return [(r, f"{path}:index {i}") for i, r in enumerate(data)]
    rows = []
    # Lines end at \n (as in io.iter_jsonl): str.splitlines would also split inside a string holding
    # U+2028 or U+0085, which json.dumps(ensure_ascii=False) leaves unescaped.
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append((json.loads(line), f"{path}:line {n}"))
            except json.JSONDecodeError as e:
                rows.append((ValueError(f"{path}:line {n}: invalid JSON line: {e.msg}"), f"{path}:line {n}"))
    return rows


def _read_file(path: Path) -> list[tuple[object, str]]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            # line_num after reading a row is its last line: the row's own line when it has no newlines
            return [(row, f"{path}:line {reader.line_num}") for row in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        return [(r, f"{path}:index {i}") for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {FILE_SUFFIXES}")


def _raw_records(source: str, split: str | None) -> list[tuple[object, str]]:
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.exists() or source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such data file")
    # Anything else is a Hugging Face dataset name (needs internet or the local datasets cache).
    data = datasets.load_dataset(source, split=split or "train")
    return [(r, f"{source}[{split or 'train'}]:index {i}") for i, r in enumerate(data)]


def read_records(
    source: str | os.PathLike, *, data_format: str | None, split: str | None,
    max_instances_per_task: int | None, prompt_field: str | None, response_field: str | None,
    skip_bad_records: bool, seed: int,
) -> tuple[list[dict], int]:
    """(normalized records, number of bad records skipped)."""
    if data_format is not None and data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    if (prompt_field or response_field) and data_format not in (None, "prompt_completion"):
        raise ValueError("prompt_field/response_field name the columns of data_format='prompt_completion'")
    source = str(source)
    skipped = 0
    if source == SYNTHETIC or source.startswith(SYNTHETIC + ":"):
        from simoe.data.synthetic import make_records

        records = make_records(source[len(SYNTHETIC) + 1:] or split or "train", seed)
    elif Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        if data_format not in (None, "sni") or not (directory / "tasks").is_dir():
            raise ValueError(f"{source}: a directory source must be an SNI task directory (tasks/*.json)")
        records = sni_records(load_sni_tasks(directory, split))  # group = task: capped below
    else:
        if data_format == "sni":
            raise ValueError(f"{source}: data_format='sni' needs an SNI task directory")
        raw = _raw_records(source, split)
        if not raw:
            raise ValueError(f"{source}: no records")
        if prompt_field or response_field:
            data_format = "prompt_completion"
        if data_format is None:  # one format per source, so a bad record's error names the missing field
            record, origin = next((r for r in raw if not isinstance(r[0], Exception)), raw[0])
            if isinstance(record, Exception):
                raise record
            data_format = detect_format(record, origin, prompt_field)
        records = []
        for record, origin in raw:
            try:
                if isinstance(record, Exception):
                    raise record
                records.append(normalize_record(record, data_format, origin, prompt_field, response_field))
            except ValueError as e:
                if not skip_bad_records:
                    raise
                skipped += 1
                warnings.warn(f"skipping bad record: {e}", stacklevel=3)
    if max_instances_per_task is not None:
        seen: Counter = Counter()
        kept = []
        for r in records:
            seen[r["group"]] += 1
            if seen[r["group"]] <= max_instances_per_task:
                kept.append(r)
        records = kept
    return records, skipped


def load_records(
    source: str | os.PathLike, *, data_format: str | None = None, split: str | None = None,
    max_instances_per_task: int | None = None, prompt_field: str | None = None,
    response_field: str | None = None, skip_bad_records: bool = False, seed: int = 0,
) -> list[dict]:
    """Normalized records from ``source``.

    ``source``: a ``.json`` (array of objects, or JSON Lines), ``.jsonl``, ``.csv`` or ``.parquet`` file; an
    SNI directory; ``"simoe:synthetic[:<split>]"`` (the built-in toy tasks, ``seed`` seeds them); or a
    Hugging Face dataset name (``datasets.load_dataset(source, split=split or "train")``). ``data_format``
    is detected from the first fields when not given (:func:`detect_format`); ``prompt_field`` and
    ``response_field`` name the columns of a prompt/response file (e.g. GSM8K's ``question``/``answer``).
    ``split`` filters SNI tasks by the official split lists. ``max_instances_per_task`` keeps the first N
    records of each group (SNI: of each task). Bad records raise ValueError naming file, line/index and
    field, or with ``skip_bad_records`` are skipped with a warning.
    """
    return read_records(
        source, data_format=data_format, split=split, max_instances_per_task=max_instances_per_task,
        prompt_field=prompt_field, response_field=response_field, skip_bad_records=skip_bad_records,
        seed=seed,
    )[0]

