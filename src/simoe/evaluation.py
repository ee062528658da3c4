"""Evaluations: Super-NaturalInstructions (ROUGE-L, exact match) and response perplexity.

SNI follows the official protocol of ``allenai/natural-instructions`` (``eval/automatic/evaluation.py``,
default track): the Tk-Instruct prompt (definition + 2 positive examples, :func:`simoe.data.sni_prompt`)
as one user turn rendered by :func:`simoe.data.render_prompt` (as ``simoe train --data_format sni``
renders it), greedy decoding; per instance the best score over the references of

* exact match after :func:`normalize_answer` (lower case, punctuation removed, whitespace collapsed;
  articles are kept, unlike SQuAD), and
* ROUGE-L F-measure of ``rouge_score`` with its default tokenizer and the Porter stemmer;

then the mean over instances, x 100 and rounded to 4 decimals, overall, per task and per category
(categories keyed as the script keys them: lower case, words joined by ``_``). The xlingual track
(GPT-2 tokenization for non-English outputs) is not implemented: the default test split is English.
``predictions.jsonl`` (``id``, ``prediction``, plus ``task_id`` and the exact ``prompt`` text the model
saw) and ``references.jsonl`` (``id``, ``references``, ``task_id``, ``task_category``, ``track``) are the
files the official script reads, so its numbers can be reproduced from them.

A prompt longer than the model's context minus ``max_new_tokens`` loses tokens from the left, as
training truncates prompts: the instance input, at the end, is kept; the definition goes first.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from torch import nn
from transformers import PreTrainedTokenizerBase

from simoe.data import SIMoECollator, build_dataset, load_sni_tasks, render_prompt, sni_prompt
from simoe.generation import context_length, eval_mode, generate_from_ids
from simoe.io import read_jsonl, save_json, save_jsonl
from simoe.model import SIMoEModel

TRACK = "default"


# ---------------------------------------------------------------------------- official metrics
def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, drop ASCII punctuation, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure, default tokenizer with stemming (the script's default track)."""
    return _scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def max_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("an instance needs at least one reference")
    return max(metric(prediction, reference) for reference in references)


def instance_metrics(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(ROUGE-L, exact match) of one instance, each the best over its references, in [0, 1]."""
    return (max_over_references(rouge_l, prediction, references),
            max_over_references(exact_match, prediction, references))


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """``{"rougeL", "exact_match"}``: mean over instances of the best score over references, x 100."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = [instance_metrics(p, r) for p, r in zip(predictions, references, strict=True)]
    rouge, em = sum(s[0] for s in scores), sum(s[1] for s in scores)
    n = len(predictions)
    return {"rougeL": round(100.0 * rouge / n, 4), "exact_match": round(100.0 * em / n, 4)}


def instance_scores(predictions: dict[str, str], references: Sequence[dict]) -> list[dict]:
    """Per instance: ``id``, ``category``, ``rougeL`` and ``exact_match`` (x 100, best over references),
    the values whose means :func:`score_references` reports; bootstrap intervals resample them."""
    rows = []
    for ref in references:
        rouge, em = instance_metrics(predictions.get(ref["id"], ""), ref["references"])
        rows.append({"id": ref["id"], "category": category_key(ref["task_category"]),
                     "rougeL": 100.0 * rouge, "exact_match": 100.0 * em})
    return rows


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (instances resampled with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def category_key(category: str) -> str:
    """How the official script names a category: ``"Word Analogy"`` -> ``"word_analogy"``."""
    return "_".join(category.lower().split())


def score_references(predictions: dict[str, str], references: Sequence[dict]) -> dict:
    """The summary of ``predictions`` (id -> text) against official reference records.

    Overall, per task (``task_id``) and per category (``task_category``) metrics, each group the mean
    over its instances, as the official script computes them. A missing prediction scores as "", as
    there. Groups keep the order of first appearance.
    """
    if not references:
        raise ValueError("no references to score")
    preds = [predictions.get(ref["id"], "") for ref in references]
    golds = [ref["references"] for ref in references]

    def grouped(keys: list[str]) -> dict[str, dict]:
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        return {key: {**compute_metrics([preds[i] for i in idx], [golds[i] for i in idx]),
                      "instances": len(idx)} for key, idx in groups.items()}

    return {
        **compute_metrics(preds, golds),
        "per_category": grouped([category_key(ref["task_category"]) for ref in references]),
        "per_task": grouped([ref["task_id"] for ref in references]),
        "instances": len(references),
        "tasks": len({ref["task_id"] for ref in references}),
        "missing_predictions": sum(ref["id"] not in predictions for ref in references),
    }


def score_files(predictions_file: str | os.PathLike, references_file: str | os.PathLike) -> dict:
    """:func:`score_references` of an official ``predictions.jsonl`` / ``references.jsonl`` pair."""
    predictions = {r["id"]: r["prediction"] for r in read_jsonl(predictions_file, ("id", "prediction"))}
    references = read_jsonl(references_file, ("id", "references", "task_id", "task_category"))
    return score_references(predictions, references)


# ---------------------------------------------------------------------------- SNI
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


# ---------------------------------------------------------------------------- perplexity
@torch.no_grad()
def response_nll(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset, batch_size: int = 4,
    training_gates: bool = False,
) -> list[tuple[float, int]]:
    """(summed NLL in nats, response tokens) of every example of a :func:`simoe.data.build_dataset`.

    Only labelled (response) tokens count. A SIMoE model routes on each example's prompt
    (``prompt_mask``) as in training, with its evaluation gates, or with its training gates
    (``training_gates``: the SIMoE layers alone in train mode, so no dropout; sampled once per
    batch for the stochastic regime).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collate = SIMoECollator(tokenizer)
    device = next(model.parameters()).device
    columns = ("input_ids", "attention_mask", "labels", "prompt_mask")
    results = []
    with eval_mode(model):
        if training_gates:
            for _, layer in model.routed_layers():
                layer.train()
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start:start + batch_size]
            batch = collate([{k: rows[k][i] for k in columns} for i in range(len(rows["input_ids"]))])
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if isinstance(model, SIMoEModel):
                inputs["prompt_mask"] = batch["prompt_mask"]
            logits = model(**inputs).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]  # token t is predicted from the logits at t - 1
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            counts = (labels != -100).sum(dim=1)
            results += [(float(s), int(c)) for s, c in zip(nll.double().sum(dim=1), counts, strict=True)]
    return results


def gate_gap(model: SIMoEModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
             batch_size: int = 4) -> dict:
    """Response NLL per token with the evaluation gates and with the training gates, and their
    difference (``gap``): how far the evaluated model is from the one training optimised."""
    nll = {}
    for name, training in (("eval_gate_nll", False), ("train_gate_nll", True)):
        per_example = response_nll(model, tokenizer, dataset, batch_size, training_gates=training)
        nll[name] = sum(n for n, _ in per_example) / max(1, sum(t for _, t in per_example))
    return {**nll, "gap": nll["eval_gate_nll"] - nll["train_gate_nll"]}


def _entry(nll: float, tokens: int) -> dict:
    mean = nll / tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": tokens}


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 4,
    max_seq_length: int | None = None,
    **data_kwargs,
) -> dict:
    """Token-weighted response NLL and perplexity of ``source`` (any training data source).

    ``nll`` is the mean NLL (nats) over all response tokens of all examples, ``perplexity`` its exp;
    ``per_group`` gives the same per record group (task / category / source) when records have one.
    ``max_seq_length`` defaults to the model's context; ``data_kwargs`` go to
    :func:`simoe.data.build_dataset`. Writes ``summary.json`` into ``output_dir`` when given.
    """
    if max_seq_length is None:
        max_seq_length = context_length(model)
        if max_seq_length is None:
            raise ValueError("the model's config has no max_position_embeddings: pass max_seq_length")
    dataset, stats = build_dataset(source, tokenizer, max_seq_length=max_seq_length, **data_kwargs)
    per_example = response_nll(model, tokenizer, dataset, batch_size)
    group_nll: dict[str, float] = {}
    group_tokens: dict[str, int] = {}
    for (nll, tokens), group in zip(per_example, dataset["group"], strict=True):
        if group is not None:
            group_nll[group] = group_nll.get(group, 0.0) + nll
            group_tokens[group] = group_tokens.get(group, 0) + tokens
    summary = {
        **_entry(sum(n for n, _ in per_example), sum(t for _, t in per_example)),
        "examples": len(per_example),
        "per_group": {g: _entry(group_nll[g], group_tokens[g]) for g in group_nll},
        "data": stats,
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        save_json(summary, Path(output_dir, "summary.json"))
    return summary
