"""Exact match per task family (the demo's synthetic families; answers compared case-exact)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from simoe.inference.generation import generate


def normalize_answer(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, drop one trailing period.

    Case is kept: the task families' answers are case-exact ("Saturday", ciphered words), and
    answering in the expected form is part of what the demo measures.
    """
    text = re.sub(r"\s+", " ", text.strip())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)


def split_record(record: dict, index: int) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of a normalised record; the answer is the last message."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"record {index}: field 'messages' must be a list of at least 2 messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(
            last.get("content"), str):
        raise ValueError(f"record {index}: field 'messages' must end with an assistant message "
                         "holding the reference answer")
    return messages[:-1], last["content"]


def _group(record: dict, index: int) -> str:
    group = record.get("group")
    if not isinstance(group, str) or not group:
        raise ValueError(f"record {index}: field 'group' must be a non-empty string")
    return group


def score_by_group(records: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match rate per ``group`` of ``predictions`` against the records' answers.

    Groups come in the order they first appear in ``records``.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = {}
    for i, (record, prediction) in enumerate(zip(records, predictions, strict=True)):
        _, answer = split_record(record, i)
        hits.setdefault(_group(record, i), []).append(exact_match(prediction, answer))
    return {group: sum(h) / len(h) for group, h in hits.items()}


def exact_match_by_group(model: nn.Module, tokenizer, records: Sequence[dict], **kw) -> dict[str, float]:
    """Generate an answer to every record's prompt and score it per group (``kw`` go to generate)."""
    prompts = [split_record(record, i)[0] for i, record in enumerate(records)]
    for i, record in enumerate(records):
        _group(record, i)  # fail before generating, not after
    return score_by_group(records, generate(model, tokenizer, prompts, **kw))

