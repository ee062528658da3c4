"""Exports of a trained SIMoE model: compact (for SIMoE inference) and merged (a plain HF model).

Compact: everything inference with the evaluation gates needs and nothing else — a
reference to the base (``base_model_name_or_path`` in ``simoe_config.json``) plus, in
``simoe_compact.safetensors``, for every upcycled tensor the input columns whose gate is non-zero
in at least one expert (``<layer>.columns``), Δ on those columns only (``<layer>.delta``), the
evaluation gates there (``<layer>.gates``, [M, kept]) and the router (``router.*``). A column
gated off in every expert contributes nothing for any routing, so dropping it changes no logit.
``export_report.json`` holds :func:`parameter_report`.

Merged: for one fixed routing r, W = W0 + Δ·diag(m) with m = Σ_j r_j z_j (evaluation gates),
written with the base's own ``save_pretrained``: transformers, vLLM or lm-eval load it without simoe.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from simoe import hard_concrete
from simoe.config import SIMoEConfig
from simoe.io import save_json, save_state
from simoe.layer import SIMoELayer
from simoe.model import SIMoEModel, upcycle
from simoe.targets import decoder_layers

COMPACT_WEIGHTS_NAME = "simoe_compact.safetensors"
REPORT_NAME = "export_report.json"
MERGE_INFO_NAME = "simoe_merge.json"

# Baseline of the report: sparse upcycling (Komatsuzaki et al.) with 4 FFN copies per layer, top-2.
MOE_EXPERTS = 4
MOE_TOP_K = 2
_FFN_NAME = re.compile(r"mlp|feed_forward|ffn")


def _column_dim(layer: SIMoELayer) -> int:
    """The dimension of Δ that a gate indexes: Linear [out, in] -> 1; Conv1D [in, out], norms -> 0."""
    return 1 if layer.delta.dim() == 2 and not isinstance(layer.base, Conv1D) else 0


# ---------------------------------------------------------------- parameter report
@torch.no_grad()
def parameter_report(model: SIMoEModel) -> dict:
    """Inference parameters of the compact model against a top-2 sparse-upcycled MoE.

    * ``base_params``: the base model's parameters (shared/tied tensors counted once).
    * ``nonzero_delta_params``: Δ entries in columns whose evaluation gate is non-zero in at
      least one expert (a column covers ``out`` entries, a norm gate one).
    * ``gate_params``: stored gate values, M per kept column. ``router_params``: the router's.
    * ``total_inference_params`` = base + non-zero Δ + gates + router.
    * Top-2 MoE of the same base with 4 copies of every FFN (the decoder layer's ``mlp``), F = Σ
      over layers of one FFN's parameters: active = base + (2 - 1)·F (two FFNs run per token, one
      of them counted in base), total = base + (4 - 1)·F. Its per-layer router (hidden x 4) is
      left out, as in the paper's comparison.
    """
    layers = [layer for _, layer in model.routed_layers()]
    simoe_tensors = {id(t) for layer in layers for t in (layer.delta, layer.log_alpha)}

    def base_count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in simoe_tensors)

    base = base_count(model.base_model)
    kept = [int(layer.gates_on().any(dim=0).sum()) for layer in layers]
    delta = sum(k * layer.params_per_gate for k, layer in zip(kept, layers, strict=True))
    gates = sum(kept) * model.simoe_config.num_experts
    router = sum(p.numel() for p in model.router.parameters())
    total = base + delta + gates + router

    ffn = 0
    for i, block in enumerate(decoder_layers(model.base_model)):
        found = [m for name, m in block.named_children() if _FFN_NAME.fullmatch(name)]
        if len(found) != 1:
            raise ValueError(f"decoder layer {i} of {type(model.base_model).__name__}: cannot find its "
                             f"FFN (a child named mlp, feed_forward or ffn); children: "
                             f"{[name for name, _ in block.named_children()]}")
        ffn += base_count(found[0])
    moe_active = base + (MOE_TOP_K - 1) * ffn
    return {
        "base_model": model.simoe_config.base_model_name_or_path,
        "num_experts": model.simoe_config.num_experts,
        "base_params": base,
        "upcycled_params": sum(layer.delta.numel() for layer in layers),
        "nonzero_delta_params": delta,
        "kept_columns": sum(kept),
        "total_columns": sum(layer.in_features for layer in layers),
        "gate_params": gates,
        "router_params": router,
        "total_inference_params": total,
        "moe_top2": {
            "experts_per_ffn": MOE_EXPERTS,
            "ffn_params_all_layers": ffn,
            "active_params": moe_active,
            "total_params": base + (MOE_EXPERTS - 1) * ffn,
        },
        "ratio_to_moe_top2_active": total / moe_active,
    }


# ---------------------------------------------------------------- compact export
@torch.no_grad()
def save_compact(model: SIMoEModel, directory: str | os.PathLike) -> dict:
    """Write the compact export (see the module docstring) and return its parameter report."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, layer in model.routed_layers():
        gates = layer.eval_gates()
        columns = layer.gates_on().any(dim=0).nonzero().squeeze(1)
        tensors[f"{name}.columns"] = columns
        tensors[f"{name}.delta"] = layer.delta.index_select(_column_dim(layer), columns)
        tensors[f"{name}.gates"] = gates.index_select(1, columns)
    for key, value in model.router.state_dict().items():
        tensors[f"router.{key}"] = value
    model.simoe_config.save_pretrained(directory)
    save_state(tensors, os.path.join(directory, COMPACT_WEIGHTS_NAME))  # atomic, on the CPU
    report = parameter_report(model)
    save_json(report, os.path.join(directory, REPORT_NAME))
    return report


def _log_alpha_for(gates: torch.Tensor, regime: str) -> torch.Tensor:
    """log α (same dtype, device and shape) whose evaluation gates (``regime``'s) are ``gates``.

    The evaluation gate is monotone in log α, so bisection on the float values finds, for
    each gate, the smallest log α reaching it; the gates were produced by this same function, so
    that log α reproduces them bit for bit (on another device the nearest attainable value is
    taken). Gates are evaluated on a tensor of the layer's shape, as the forward evaluates them.
    """
    lo, hi = torch.full_like(gates, -40.0), torch.full_like(gates, 40.0)  # gates 0 and 1 in float32
    while True:
        mid = (lo + hi) / 2
        done = (mid == lo) | (mid == hi)  # lo and hi are adjacent floats
        if bool(done.all()):
            break
        up = (hard_concrete.gates(mid, regime, training=False) >= gates) & ~done
        hi, lo = torch.where(up, mid, hi), torch.where(up | done, lo, mid)
    error_hi, error_lo = ((hard_concrete.gates(x, regime, training=False) - gates).abs() for x in (hi, lo))
    return torch.where(error_hi <= error_lo, hi, lo)


def _check_columns(columns: torch.Tensor, size: int, where: str) -> None:
    if columns.dtype != torch.int64 or columns.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D int64 tensor, got {columns.dtype} {tuple(columns.shape)}")
    if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= size):
        raise ValueError(f"{where}: column index outside [0, {size})")
    if columns.numel() > 1 and not bool((columns[1:] > columns[:-1]).all()):
        raise ValueError(f"{where}: column indices must be strictly increasing")


@torch.no_grad()
def load_compact(base_model: PreTrainedModel, directory: str | os.PathLike) -> SIMoEModel:
    """Upcycle ``base_model`` (in place) as the export's config says and load the compact tensors.

    Returns a :class:`SIMoEModel` in eval mode that computes the exported model's logits exactly:
    Δ is the stored Δ on the kept columns and 0 elsewhere; log α is chosen so that the
    evaluation gates equal the stored gate values bit for bit (0 on dropped columns). Only
    the evaluation gates are preserved, not a stochastic regime's training-time gate distribution: a compact
    model is for inference.
    """
    config = SIMoEConfig.from_pretrained(directory)
    path = os.path.join(directory, COMPACT_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {COMPACT_WEIGHTS_NAME} in {directory}")
    loaded = load_file(path)
    model = upcycle(base_model, config)
    layers = list(model.routed_layers())
    expected = {f"{n}.{part}" for n, _ in layers for part in ("columns", "delta", "gates")}
    expected |= {f"router.{k}" for k in model.router.state_dict()}
    missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved from another base?")
    m = config.num_experts
    for name, layer in layers:
        columns = loaded[f"{name}.columns"]
        _check_columns(columns, layer.in_features, f"{path}: {name}.columns")
        dim, k = _column_dim(layer), columns.numel()
        delta, gates = loaded[f"{name}.delta"], loaded[f"{name}.gates"]
        shape = list(layer.delta.shape)
        shape[dim] = k
        if list(delta.shape) != shape:
            raise ValueError(f"{path}: {name}.delta has shape {tuple(delta.shape)}, expected {tuple(shape)}")
        if tuple(gates.shape) != (m, k):
            raise ValueError(f"{path}: {name}.gates has shape {tuple(gates.shape)}, expected {(m, k)}")
        if not bool(((gates >= 0) & (gates <= 1)).all()):
            raise ValueError(f"{path}: {name}.gates has values outside [0, 1]")
        device = layer.delta.device
        columns = columns.to(device)
        layer.delta.zero_().index_copy_(dim, columns, delta.to(device, layer.delta.dtype))
        full = torch.zeros_like(layer.log_alpha).index_copy_(1, columns, gates.to(device, torch.float32))
        layer.log_alpha.copy_(_log_alpha_for(full, config.gate_regime))
        error = float((layer.eval_gates() - full).abs().max())
        if error > 1e-6:
            raise ValueError(f"{path}: {name}.gates are not {config.gate_regime} hard-concrete gates "
                             f"(off by {error:.2g})")
    model.router.load_state_dict({k.removeprefix("router."): v for k, v in loaded.items()
                                  if k.startswith("router.")})
    return model.eval()


# ---------------------------------------------------------------- merged export
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


@torch.no_grad()
def merged_state_dict(model: SIMoEModel, routing: torch.Tensor) -> dict[str, torch.Tensor]:
    """The base's state dict with every upcycled tensor replaced by W0 + Δ·diag(m), m = r @ z.

    Norms merge the same way: ``SIMoENorm`` adds m⊙Δ⊙(y(1) − y(0)), which equals y(g0 + m⊙Δ)
    for any norm affine in its stored weight — Gemma's n(x)·(1 + g) included.
    """
    m = model.simoe_config.num_experts
    if routing.shape != (m,) or not bool(torch.isfinite(routing).all()) or bool((routing < 0).any()):
        raise ValueError(f"routing must be {m} finite non-negative weights, got {routing.tolist()}")
    state = model.base_model.state_dict()
    for name, layer in model.routed_layers():
        # m = r @ z, computed as set_routing computes it for a batch
        merged_gates = routing.to(layer.log_alpha)[None] @ layer.eval_gates()
        merged_gates = merged_gates[0, :, None] if isinstance(layer.base, Conv1D) else merged_gates[0]
        w0 = layer.base.weight
        merged = (w0.float() + layer.delta * merged_gates).to(w0.dtype)
        del state[f"{name}.delta"], state[f"{name}.log_alpha"]
        for key in [k for k in state if k.startswith(f"{name}.base.")]:
            state[f"{name}.{key.removeprefix(f'{name}.base.')}"] = state.pop(key)
        state[f"{name}.weight"] = merged
    return state


def save_merged(model: SIMoEModel, routing: torch.Tensor, directory: str | os.PathLike,
                tokenizer=None) -> None:
    """Write a plain Hugging Face model directory: the SIMoE model under one fixed routing.

    ``routing`` [M] (from :func:`parse_routing` or :func:`mean_routing`). The caller's
    model is not modified: merged tensors are new, the rest are the base's own. Also writes
    ``simoe_merge.json`` (the routing and the base it came from), which loaders ignore.
    """
    routing = torch.as_tensor(routing, dtype=torch.float32)
    state = merged_state_dict(model, routing)
    model.base_model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save_json({"base_model": model.simoe_config.base_model_name_or_path,
               "simoe_config": model.simoe_config.to_dict(),
               "routing": routing.tolist()}, os.path.join(directory, MERGE_INFO_NAME))
