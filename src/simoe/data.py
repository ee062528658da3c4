"""Instruction data: load records from files, SNI task directories or the Hub; tokenize them for training.

Every source becomes a list of *normalized records*::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
     "group": str | None,      # task / dataset name, for per-task analyses (see GROUP_FIELDS)
     "origin": str}            # "<file>:line N" (JSON Lines, CSV) or "<file>:index i" (else), for errors

A conversation is an optional system message, then user and assistant turns alternating, starting with a
user turn and ending with an assistant turn. Tokenization (:func:`tokenize_record`) puts the loss on every
assistant turn (content + the end-of-turn token generation stops on) and marks in ``prompt_mask`` the
tokens the router reads: everything before the *first* assistant response (system + first user turn +
the assistant header). Later turns are not routed on: they come after the first response, so routing on
them would let the router see a response it is trained to produce. A single-turn prompt is exactly
:func:`render_prompt`'s output, so generation (which routes on the whole prompt) routes as training did.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "chat", "prompt_completion", "sni")
ROLES = ("system", "user", "assistant")
# The first of these fields that a record has (a non-empty string) becomes its group: SNI-style task
# names, then categories, then the dataset of origin (the Tülu-3 SFT mixture's "source").
GROUP_FIELDS = ("task", "category", "source")
SYNTHETIC = "simoe:synthetic"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# Plain template, for tokenizers without a chat template (base models). The user turn ends with the
# response header, so a prompt always ends where the response starts; each response ends with eos.
PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"


# ---------------------------------------------------------------------------- Super-NaturalInstructions
@dataclass
class SNITask:
    """One SNI task file: ``data`` is the parsed JSON (``Instances`` capped as loaded)."""

    name: str
    category: str
    path: str
    data: dict

    @property
    def instances(self) -> list[dict]:
        """``[{"id", "input", "output": [reference, ...]}]`` in file order."""
        return self.data["Instances"]


def sni_prompt(task: dict, instance: dict, num_pos_examples: int = 2) -> str:
    """The Tk-Instruct "definition + positive examples" encoding of an SNI instance.

    Reproduces ``DataCollatorForNI`` of yizhongw/Tk-Instruct (``src/ni_collator.py``) with
    ``add_task_definition=True``, no task name, no negative examples, no explanations, character for
    character, including its quirks (a "." appended to text not ending in punctuation, the leading
    spaces of " Positive Example" and " Output:"). Unlike the collator it never drops examples to fit a
    length; :func:`tokenize_record` truncates the prompt instead.
    """

    def end(text: str) -> str:  # Tk-Instruct checks the string built so far, not the field alone
        return text if text[-1] in string.punctuation else text + "."

    definition = task["Definition"]
    definition = definition[0] if isinstance(definition, list) else definition
    source = end("Definition: " + definition.strip()) + "\n\n"
    for i, example in enumerate(task["Positive Examples"][:num_pos_examples]):
        text = end(f" Positive Example {i + 1} -\nInput: {example['input'].strip()}") + "\n"
        text = end(text + f" Output: {example['output'].strip()}") + "\n"
        source += text + "\n"
    return source + end(f"Now complete the following example -\nInput: {instance['input'].strip()}") + (
        "\nOutput: "
    )


def _sni_split_names(directory: Path, split: str) -> set[str]:
    path = directory / "splits" / f"{split}_tasks.txt"
    if not path.is_file():
        raise ValueError(f"{directory}: no split list {path.relative_to(directory)} for split={split!r}")
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _check_sni_task(data: object, path: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (an SNI task)")
    for field in ("Definition", "Categories", "Positive Examples", "Instances"):
        if field not in data:
            raise ValueError(f"{path}: field {field!r} is missing")
    if not isinstance(data["Categories"], list) or not data["Categories"]:
        raise ValueError(f"{path}: field 'Categories' must be a non-empty list")
    for key in ("Positive Examples", "Instances"):
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict) or not isinstance(item.get("input"), str):
                raise ValueError(f"{path}: {key}[{i}]: field 'input' must be a string")
            out = item.get("output")  # an example has one output, an instance a list of references
            if key == "Positive Examples" and not isinstance(out, str):
                raise ValueError(f"{path}: {key}[{i}]: field 'output' must be a string")
            references = isinstance(out, list) and out and all(isinstance(o, str) for o in out)
            if key == "Instances" and not references:
                raise ValueError(f"{path}: {key}[{i}]: field 'output' must be a non-empty list of strings")


def load_sni_tasks(
    directory: str | os.PathLike, split: str | None = None, max_instances_per_task: int | None = None
) -> list[SNITask]:
    """The task files of an SNI directory (``tasks/*.json``, ``splits/{train,test}_tasks.txt``).

    ``split`` keeps the tasks listed in the official split list (tasks of the list missing from
    ``tasks/`` are skipped: the directory may be a subset); ``None`` keeps every task file present.
    ``max_instances_per_task`` keeps the first N instances of each task, in file order. Tasks are
    sorted by name.
    """
    directory = Path(directory)
    files = sorted((directory / "tasks").glob("*.json"))
    if not files:
        raise ValueError(f"{directory}: no SNI task files tasks/*.json")
    if split is not None:
        names = _sni_split_names(directory, split)
        files = [f for f in files if f.stem in names]
    tasks = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:line {e.lineno}: invalid JSON: {e.msg}") from e
        _check_sni_task(data, str(file))
        if max_instances_per_task is not None:
            data["Instances"] = data["Instances"][:max_instances_per_task]
        tasks.append(SNITask(file.stem, data["Categories"][0], str(file), data))
    return tasks


def _sni_records(tasks: list[SNITask]) -> list[dict]:
    # One example per instance, trained on its first reference. An empty reference is the task's
    # real answer (e.g. removing the vowels of "a"), so it is kept: the target is then end-of-turn only.
    return [
        {"messages": [{"role": "user", "content": sni_prompt(task.data, inst)},
                      {"role": "assistant", "content": inst["output"][0]}],
         "group": task.name, "origin": f"{task.path}:index {i}"}
        for task in tasks for i, inst in enumerate(task.instances)
    ]


# ---------------------------------------------------------------------------- records
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
    for n, line in enumerate(text.splitlines(), start=1):
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


def _load_records(
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
        from simoe.synthetic_tasks import make_records  # written in parallel; imported only when used

        records = make_records(source[len(SYNTHETIC) + 1:] or split or "train", seed)
    elif Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        if data_format not in (None, "sni") or not (directory / "tasks").is_dir():
            raise ValueError(f"{source}: a directory source must be an SNI task directory (tasks/*.json)")
        records = _sni_records(load_sni_tasks(directory, split))  # group = task: capped below
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
    return _load_records(
        source, data_format=data_format, split=split, max_instances_per_task=max_instances_per_task,
        prompt_field=prompt_field, response_field=response_field, skip_bad_records=skip_bad_records,
        seed=seed,
    )[0]


# ---------------------------------------------------------------------------- tokenization
def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    ))


Spans = list[tuple[int, int]]


def _plain_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], Spans]:
    """Plain-template ids of ``messages`` and the [start, end) span of every assistant turn.

    Responses are tokenized apart from the text before them, so the prompt's ids are the same whether
    or not a response follows. BOS leads when the tokenizer itself starts encoded text with it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no chat template and no eos token to end responses with")
    bos = tokenizer.bos_token_id
    ids = [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []
    spans, text = [], ""
    for m in messages:
        if m["role"] == "assistant":
            ids += _encode(tokenizer, text)
            text, start = "", len(ids)
            ids += _encode(tokenizer, m["content"]) + [eos]
            spans.append((start, len(ids)))
        else:
            text += (PLAIN_SYSTEM if m["role"] == "system" else PLAIN_USER).format(content=m["content"])
    return ids + _encode(tokenizer, text), spans


def _chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], origin: str
) -> tuple[list[int], Spans]:
    """Chat-template ids of a conversation and its assistant spans, by diffing rendered prefixes.

    The span of assistant turn i runs from the end of ``messages[:i]`` rendered with the generation
    prompt to the end of ``messages[:i + 1]``; both must be prefixes of the whole rendering (as in
    open-instruct). The span stops at its last special token (the end-of-turn token generation stops
    on): what a template writes after it, like ChatML's newline, is never generated.
    """
    full = _chat_ids(tokenizer, messages, False)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, messages[:i], True)
        end = full if i == len(messages) - 1 else _chat_ids(tokenizer, messages[: i + 1], False)
        if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
            raise ValueError(
                f"{origin}: the tokenizer's chat template is not prefix-stable at message {i}: rendering "
                "the conversation up to a turn is not a prefix of rendering all of it (e.g. it rewrites "
                "earlier turns), so the assistant tokens cannot be located"
            )
        stops = [j for j in range(len(start), len(end)) if end[j] in special]
        if not stops:
            raise ValueError(f"{origin}: the chat template ends assistant turn {i} without a special token, "
                             "so a model trained on it cannot learn to stop")
        spans.append((len(start), stops[-1] + 1))
    return full, spans


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a prompt exactly as training saw them before the (final) assistant response.

    ``messages`` ends with a user turn (a final assistant turn is left out). With a chat template:
    ``apply_chat_template(..., add_generation_prompt=True)``; without one, the plain template
    ``[system + "\\n\\n"] "### Instruction:\\n{user}\\n\\n### Response:\\n"`` (PLAIN_SYSTEM, PLAIN_USER;
    earlier responses end with eos).
    """
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    check_messages([*messages, {"role": "assistant", "content": ""}], "prompt")
    if _has_chat_template(tokenizer):
        return _chat_ids(tokenizer, messages, True)
    return _plain_ids(tokenizer, messages)[0]


def template_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The token ids the prompt template puts before and after a single user turn's text.

    Two prompts that differ only in the user text are rendered as generation and training render
    them (:func:`render_prompt`); their longest common prefix and suffix are the template's fixed
    tokens: for SmolLM2 the default system prompt and the role headers before the text, the end of
    turn and the assistant header after it.
    """
    a = render_prompt(tokenizer, [{"role": "user", "content": "Alpha 1 beta, gamma."}])
    b = render_prompt(tokenizer, [{"role": "user", "content": "Zulu; 9 yankee x-ray?"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    m = 0
    while m < min(len(a), len(b)) - n and a[-1 - m] == b[-1 - m]:
        m += 1
    return a[:n], (a[len(a) - m:] if m else [])


def _tokenize(
    record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[dict | None, bool]:
    """(features or None when no response token fits, whether the example was truncated)."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    origin = record.get("origin") or "record"
    check_messages(record.get("messages"), origin)
    if _has_chat_template(tokenizer):
        ids, spans = _chat_template_ids(tokenizer, record["messages"], origin)
    else:
        ids, spans = _plain_ids(tokenizer, record["messages"])
    labels = [-100] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    prompt_len = spans[0][0]
    # Too long: cut the prompt from the left, down to half the budget (the end of the prompt, nearest
    # the response, matters most; the router needs prompt tokens), then the response from the right.
    floor = min(prompt_len, max(1, max_seq_length // 2))
    keep = min(prompt_len, max(max_seq_length - (len(ids) - prompt_len), floor))
    total, cut = len(ids), prompt_len - keep
    ids, labels = ids[cut:][:max_seq_length], labels[cut:][:max_seq_length]
    truncated = len(ids) < total
    if all(label == -100 for label in labels):
        return None, truncated
    features = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                "prompt_mask": [1] * keep + [0] * (len(ids) - keep)}
    return features, truncated


def tokenize_record(record: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict | None:
    """``input_ids``, ``attention_mask``, ``labels`` and ``prompt_mask`` of a normalized record.

    ``labels`` is -100 except on assistant tokens (content and end-of-turn / eos, every turn);
    ``prompt_mask`` is 1 on everything before the first response (what the router reads). Longer than
    ``max_seq_length``: the prompt loses tokens from the left, keeping at least half the length (or all
    of a shorter prompt), then the response loses tokens from the right. Returns None when no response
    token is left.
    """
    return _tokenize(record, tokenizer, max_seq_length)[0]


def build_dataset(
    source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, *, data_format: str | None = None,
    max_seq_length: int = 1024, split: str | None = None, max_instances_per_task: int | None = None,
    prompt_field: str | None = None, response_field: str | None = None, skip_bad_records: bool = False,
    seed: int = 0,
) -> tuple[datasets.Dataset, dict]:
    """Tokenized training examples of ``source`` (see :func:`load_records`) and counts.

    Columns: ``input_ids``, ``attention_mask``, ``labels``, ``prompt_mask`` (for :class:`SIMoECollator`),
    ``group`` and ``origin``. Stats: ``records`` (loaded), ``skipped_bad``, ``dropped_too_long`` (no
    response token fits), ``truncated``, ``examples``, ``tokens``, ``loss_tokens``. Records keep their
    order; shuffling is the training loop's job.
    """
    records, skipped = _load_records(
        source, data_format=data_format, split=split, max_instances_per_task=max_instances_per_task,
        prompt_field=prompt_field, response_field=response_field, skip_bad_records=skip_bad_records,
        seed=seed,
    )
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_mask")}
    columns.update(group=[], origin=[])
    dropped = truncated = 0
    for record in records:
        features, cut = _tokenize(record, tokenizer, max_seq_length)
        truncated += cut
        if features is None:
            dropped += 1
            continue
        for key, value in features.items():
            columns[key].append(value)
        columns["group"].append(record.get("group"))
        columns["origin"].append(record.get("origin"))
    stats = {
        "records": len(records), "skipped_bad": skipped, "dropped_too_long": dropped, "truncated": truncated,
        "examples": len(columns["input_ids"]),
        "tokens": sum(map(len, columns["input_ids"])),
        "loss_tokens": sum(sum(label != -100 for label in labels) for labels in columns["labels"]),
    }
    if not stats["examples"]:
        raise ValueError(f"{source}: no training example left ({stats})")
    logger.info("%s: %s", source, ", ".join(f"{k}={v}" for k, v in stats.items()))
    return datasets.Dataset.from_dict(columns), stats


def eos_ids(model: nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos and the model's generation_config eos ids (chat models often differ)."""
    ids = [tokenizer.eos_token_id]
    if model is not None:
        config = getattr(model, "generation_config", None)
        if config is None:  # a SIMoE / SMEAR model: the generation config is its base model's
            config = model.base_model.generation_config
        ids.append(config.eos_token_id)
    flat = []
    for entry in ids:
        flat.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    return list(dict.fromkeys(int(i) for i in flat if i is not None))


def pad_id_of(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> int:
    """The id sequences are padded with (padding is masked out, so any of these serves): the
    tokenizer's pad token, else the first of :func:`eos_ids`."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with"
                         + (", nor has the model's generation config an eos" if model is not None else ""))
    return eos[0]


@dataclass
class SIMoECollator:
    """Right-pads a list of tokenized examples into long tensors for :class:`~simoe.model.SIMoEModel`.

    ``input_ids`` with the pad token (eos when there is none: masked out anyway), ``attention_mask``
    and ``prompt_mask`` with 0, ``labels`` with -100. Other keys (``group``, ``origin``) are left out.
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = pad_id_of(self.tokenizer)
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "prompt_mask": 0}
        return {
            key: torch.tensor([[*f[key], *[pad] * (length - len(f[key]))] for f in features],
                              dtype=torch.long)
            for key, pad in pads.items()
        }
