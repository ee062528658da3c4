"""Fixed routings: parse ``expert:K`` / ``weights:...`` / ``dataset:FILE`` and resolve them for a model."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from simoe.data import load_records, pad_id_of, render_prompt
from simoe.inference.generation import batches
from simoe.inference.loading import first_prompt
from simoe.model import SIMoEModel


def parse_routing(spec: str, num_experts: int) -> torch.Tensor | Path:
    """Parse ``expert:K``, ``weights:w1,...,wM`` or ``dataset:FILE``.

    ``expert:K`` (K 0-based, in [0, M)) and ``weights:...`` return the routing [M] (fp32, sums to
    1); weights must be M finite non-negative numbers, not all 0, and are normalised to sum to 1
    (the router's routing always does), so ``weights:1,1,0,0`` is the even routing over experts 0, 1.
    ``dataset:FILE`` returns the file's path (it must exist); route its prompts with
    :func:`mean_routing`.
    """
    kind, sep, value = spec.partition(":")
    if not sep or kind not in ("expert", "weights", "dataset"):
        raise ValueError(f"routing {spec!r}: expected expert:K, weights:w1,...,wM or dataset:FILE")
    if kind == "dataset":
        if not value or not os.path.isfile(value):
            raise ValueError(f"routing {spec!r}: dataset file {value!r} does not exist")
        return Path(value)
    if kind == "expert":
        try:
            k = int(value)
        except ValueError:
            raise ValueError(f"routing {spec!r}: K={value!r} is not an integer") from None
        if not 0 <= k < num_experts:
            raise ValueError(f"routing {spec!r}: expert K={k} outside [0, {num_experts}) (0-based)")
        routing = torch.zeros(num_experts)
        routing[k] = 1.0
        return routing
    parts = value.split(",")
    if len(parts) != num_experts:
        raise ValueError(f"routing {spec!r}: {len(parts)} weights given, the model has {num_experts} experts")
    weights = []
    for i, part in enumerate(parts):
        try:
            w = float(part)
        except ValueError:
            raise ValueError(f"routing {spec!r}: weight {i} ({part!r}) is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"routing {spec!r}: weight {i} ({part!r}) must be finite and >= 0")
        weights.append(w)
    if sum(weights) == 0:
        raise ValueError(f"routing {spec!r}: the weights are all 0")
    routing = torch.tensor(weights, dtype=torch.float64)
    return (routing / routing.sum()).float()


@torch.no_grad()
def mean_routing(model: SIMoEModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The mean routing [M] over every prompt of ``batches``.

    Each batch is a mapping with ``input_ids`` [batch, seq] and optional ``attention_mask`` and
    ``prompt_mask`` (as :meth:`SIMoEModel.route` takes them); every prompt weighs the same,
    whatever its batch. The model routes in eval mode; its modes are restored afterwards.
    """
    modes = {module: module.training for module in model.modules()}
    device = model.router.temperature.device
    total, count = None, 0
    try:
        model.eval()
        for i, batch in enumerate(batches):
            if "input_ids" not in batch:
                raise ValueError(f"batch {i}: no input_ids (keys: {sorted(batch)})")
            tensors = {k: batch[k].to(device) if batch.get(k) is not None else None
                       for k in ("input_ids", "attention_mask", "prompt_mask")}
            r = model.route(**tensors).double().sum(dim=0)
            total = r if total is None else total + r
            count += tensors["input_ids"].shape[0]
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not count:
        raise ValueError("mean_routing: no prompts to route")
    return (total / count).float()



def resolve_routing(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: str, batch_size: int = 16,
    data_format: str | None = None,
) -> torch.Tensor:
    """The fixed routing [M] that ``spec`` names: ``expert:K``, ``weights:w1,...,wM`` or ``dataset:FILE``.

    ``dataset:FILE``: the mean routing over the file's records (any format that
    :func:`simoe.data.load_records` reads), each routed on its prompt before the first response,
    rendered as training renders it, so the routing is the one training and generation computed.
    """
    if not isinstance(model, SIMoEModel):
        raise ValueError(f"routing {spec!r} needs a SIMoE model (a checkpoint or a compact export); this is "
                         f"a plain {type(model).__name__} (a merged export has its routing built in)")
    routing = parse_routing(spec, model.simoe_config.num_experts)
    if isinstance(routing, torch.Tensor):
        return routing
    records = load_records(routing, data_format=data_format)
    prompts = [render_prompt(tokenizer, first_prompt(r["messages"])) for r in records]
    return mean_routing(model, batches(prompts, batch_size, pad_id_of(tokenizer, model)))

