"""Response perplexity on any training data, and the gate-consistency gap (evaluation-gate minus
training-gate response NLL).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from simoe.data import SIMoECollator, build_dataset
from simoe.inference.generation import context_length, eval_mode
from simoe.io import save_json
from simoe.model import SIMoEModel


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

