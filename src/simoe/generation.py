"""Batched greedy generation from chat prompts, and exact-match scoring per task group.

Works for a :class:`~simoe.model.SIMoEModel` (whose ``generate`` routes each prompt once) and for a
plain Hugging Face ``PreTrainedModel``: both take ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from simoe.data import render_prompt


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (deterministic gates, no dropout) for the block; the previous mode comes back after.

    Evaluating in the middle of training must not sample gates, nor leave the model in eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded: every prompt ends where generation begins."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_left needs at least one sequence and no empty sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokenizer's eos and the model's generation_config eos ids (chat models often differ)."""
    config = getattr(model, "generation_config", None)
    if config is None:  # a SIMoEModel: the generation config is its base model's
        config = model.base_model.generation_config
    ids = [tokenizer.eos_token_id, config.eos_token_id]
    flat = []
    for entry in ids:
        flat.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    return list(dict.fromkeys(int(i) for i in flat if i is not None))


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    **generate_kwargs,
) -> list[str]:
    """The model's answer to each chat prompt (messages without the answer), as stripped text.

    Prompts are rendered by :func:`simoe.data.render_prompt` (with the generation prompt),
    left-padded in batches of ``batch_size`` and decoded greedily unless ``generate_kwargs`` say
    otherwise; only the new tokens are decoded, without special tokens. Generation stops at the
    tokenizer's and the model's eos tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError("neither the tokenizer nor the model's generation_config has an eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
    kwargs.update(generate_kwargs)
    device = next(model.parameters()).device
    starts = range(0, len(prompts), batch_size)
    outputs: list[str] = []
    with eval_mode(model):
        for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2):
            ids, mask = pad_left([render_prompt(tokenizer, m) for m in prompts[start:start + batch_size]],
                                 pad_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            outputs.extend(t.strip() for t in texts)
    return outputs


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
