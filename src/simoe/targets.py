"""Which modules of a base model get upcycled: chosen by module type, not by hard-coded names."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from simoe.config import SIMoEConfig

_NORM_NAME = re.compile(r".*(RMSNorm|LayerNorm)$")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learnable 1-D weight (LayerNorm, RMSNorm and their kin)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or bool(
        _NORM_NAME.match(type(module).__name__)
    )


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def find_targets(model: nn.Module, config: SIMoEConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module to upcycle, in model order."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [
        (name, m) for name, m in model.named_modules() if name and (is_linear(m) or is_norm(m))
    ]
    spec = config.target_modules
    if isinstance(spec, list):
        selected = [(n, m) for n, m in candidates if any(_name_matches(n, k) for k in spec)]
        unmatched = [k for k in spec if not any(_name_matches(n, k) for n, _ in candidates)]
        if unmatched:
            suffixes = sorted({n.split(".")[-1] for n, _ in candidates})
            raise ValueError(
                f"target_modules {unmatched} match no Linear, Conv1D or norm module of "
                f"{type(model).__name__}; module names that exist: {suffixes}"
            )
    elif spec == "all-linear":
        selected = [(n, m) for n, m in candidates if is_linear(m) and m is not output_layer]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"target_modules {spec!r} is neither 'all-linear' nor a regex: {e}") from e
        selected = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
    if config.upcycle_norms:
        chosen = {n for n, _ in selected}
        selected += [(n, m) for n, m in candidates if is_norm(m) and n not in chosen]
        order = {n: i for i, (n, _) in enumerate(candidates)}
        selected.sort(key=lambda nm: order[nm[0]])
    if not selected:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={spec!r} "
            f"(upcycle_norms={config.upcycle_norms}); candidates: {[n for n, _ in candidates][:20]}"
        )
    return selected
