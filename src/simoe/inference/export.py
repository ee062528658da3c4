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

import os

import torch
from transformers import PreTrainedModel

from simoe import hard_concrete
from simoe.config import SIMoEConfig
from simoe.io import read_state, save_json, save_state
from simoe.masked_delta import x_columns
from simoe.model import SIMoEModel, upcycle
from simoe.parameters import parameter_report

COMPACT_WEIGHTS_NAME = "simoe_compact.safetensors"


REPORT_NAME = "export_report.json"


MERGE_INFO_NAME = "simoe_merge.json"


@torch.no_grad()
def save_compact(model: SIMoEModel, directory: str | os.PathLike) -> dict:
    """Write the compact export (see the module docstring) and return its parameter report."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, layer in model.routed_layers():
        gates = layer.eval_gates()
        columns = layer.gates_on().any(dim=0).nonzero().squeeze(1)
        tensors[f"{name}.columns"] = x_columns(layer.kept, columns)  # the input's columns
        tensors[f"{name}.delta"] = layer.delta.index_select(layer.column_dim, columns)
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
    loaded = read_state(path)
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
        dim, k = layer.column_dim, columns.numel()
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
        merged = layer.folded_weight(merged_gates[0])
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

