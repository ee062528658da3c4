"""The inference parameters of a SIMoE model (what its compact export holds), against a top-2
sparse-upcycled MoE of the same base."""

from __future__ import annotations

import re

import torch

from simoe.model import SIMoEModel
from simoe.targets import decoder_layers

# Baseline of the report: sparse upcycling (Komatsuzaki et al.) with 4 FFN copies per layer, top-2.
MOE_EXPERTS = 4
MOE_TOP_K = 2
_FFN_NAME = re.compile(r"mlp|feed_forward|ffn")


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

    def base_count(module: torch.nn.Module) -> int:  # ds_numel: the full size of a ZeRO-3 partition
        params = [p for p in module.parameters() if id(p) not in simoe_tensors]
        return sum(getattr(p, "ds_numel", p.numel()) for p in params)

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
        "upcycled_params": sum(layer.weight_shape.numel() for layer in layers),
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

