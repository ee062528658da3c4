"""The official Super-NaturalInstructions metrics, and scoring prediction files with intervals.

They follow ``allenai/natural-instructions`` (``eval/automatic/evaluation.py``, default track): per
instance the best score over the references of

* exact match after :func:`normalize_answer` (lower case, punctuation removed, whitespace collapsed;
  articles are kept, unlike SQuAD), and
* ROUGE-L F-measure of ``rouge_score`` with its default tokenizer and the Porter stemmer;

then the mean over instances, x 100 and rounded to 4 decimals, overall, per task and per category
(categories keyed as the script keys them: lower case, words joined by ``_``). The xlingual track
(GPT-2 tokenization for non-English outputs) is not implemented: the default test split is English.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from simoe.io import read_jsonl

TRACK = "default"


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

