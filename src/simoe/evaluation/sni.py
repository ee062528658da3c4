"""Super-NaturalInstructions evaluation, the official protocol.

The Tk-Instruct prompt (definition + 2 positive examples, :func:`simoe.data.sni_prompt`) as one user
turn rendered by :func:`simoe.data.render_prompt` (as ``simoe train --data_format sni`` renders it),
greedy decoding, scored by :mod:`simoe.evaluation.metrics`. ``predictions.jsonl`` (``id``,
``prediction``, plus ``task_id`` and the exact ``prompt`` text the model saw) and ``references.jsonl``
(``id``, ``references``, ``task_id``, ``task_category``, ``track``) are the files the official
script reads, so its numbers can be reproduced from them.

A prompt longer than the model's context minus ``max_new_tokens`` loses tokens from the left, as
training truncates prompts: the instance input, at the end, is kept; the definition goes first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from simoe.data import load_sni_tasks, render_prompt, sni_prompt
from simoe.evaluation.metrics import TRACK, score_references
from simoe.inference.generation import context_length, generate_from_ids
from simoe.io import save_json, save_jsonl


def evaluate_sni(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split: str = "test",
    max_instances: int | None = None,
    tasks: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> dict:
    """Generate for the SNI instances of ``split`` and score them (see the module docstring).

    Writes ``predictions.jsonl``, ``references.jsonl`` and ``summary.json`` into ``output_dir`` and
    returns the summary: ``rougeL``, ``exact_match``, ``per_category``, ``per_task`` and counts.
    ``max_instances`` keeps the first N instances of each task; ``tasks`` keeps the named tasks.
    """
    loaded = load_sni_tasks(data_dir, split, max_instances)
    if tasks:
        wanted = set(tasks)
        unknown = sorted(wanted - {t.name for t in loaded})
        if unknown:
            raise ValueError(f"{data_dir}: task(s) {unknown} are not in the {split!r} split's task files")
        loaded = [t for t in loaded if t.name in wanted]
    instances = [(task, inst) for task in loaded for inst in task.instances]
    if not instances:
        raise ValueError(f"{data_dir}: no {split!r} instances to evaluate")

    context = context_length(model)
    budget = None if context is None else context - max_new_tokens
    if budget is not None and budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens")
    prompts, truncated = [], 0
    for task, inst in instances:
        ids = render_prompt(tokenizer, [{"role": "user", "content": sni_prompt(task.data, inst)}])
        if budget is not None and len(ids) > budget:
            ids, truncated = ids[len(ids) - budget:], truncated + 1  # keep the end: the instance input
        prompts.append(ids)
    outputs = generate_from_ids(model, tokenizer, prompts, batch_size=batch_size,
                                max_new_tokens=max_new_tokens)

    references = [{"id": inst["id"], "references": inst["output"], "task_id": task.name,
                   "task_category": task.category, "track": TRACK} for task, inst in instances]
    predictions = [{"id": inst["id"], "prediction": out["response"], "task_id": task.name,
                    "prompt": tokenizer.decode(ids)}
                   for (task, inst), out, ids in zip(instances, outputs, prompts, strict=True)]
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_jsonl(predictions, out_dir / "predictions.jsonl")
    save_jsonl(references, out_dir / "references.jsonl")
    summary = score_references({p["id"]: p["prediction"] for p in predictions}, references)
    summary["truncated_prompts"] = truncated
    save_json(summary, out_dir / "summary.json")
    return summary

