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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The base model's stack of decoder blocks (the ModuleList as long as num_hidden_layers)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def _norms_beside(model: nn.Module, candidates: list, selected: list) -> list[tuple[str, nn.Module]]:
    """The norms ``upcycle_norms`` adds: those of the decoder layers that hold a selected module, and
    those outside the decoder layers that come after the first selected module (the final norm).

    Upcycling a norm below the lowest targeted layer would make every backward pass run through
    the whole stack for it; with target_modules 'all-linear' this is every norm but an embedding norm.
    """
    try:
        blocks = decoder_layers(model)
    except (ValueError, AttributeError):  # not a decoder stack we recognise: every norm
        return [(n, m) for n, m in candidates if is_norm(m)]
    block_of = {}
    for i, block in enumerate(blocks):
        for module in block.modules():
            block_of[id(module)] = i
    targeted = {block_of[id(m)] for _, m in selected if id(m) in block_of}
    order = {n: i for i, (n, _) in enumerate(candidates)}
    first = min((order[n] for n, _ in selected), default=len(candidates))
    return [(n, m) for n, m in candidates if is_norm(m) and (
        block_of.get(id(m)) in targeted if id(m) in block_of else order[n] > first)]


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
    elif spec == "all-linear":  # every block is targeted, so upcycle_norms adds each block's norms
        selected = [(n, m) for n, m in candidates if is_linear(m) and m is not output_layer]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"target_modules {spec!r} is neither 'all-linear' nor a regex: {e}") from e
        selected = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
    if config.upcycle_norms:
        chosen = {n for n, _ in selected}
        selected += [(n, m) for n, m in _norms_beside(model, candidates, selected) if n not in chosen]
        order = {n: i for i, (n, _) in enumerate(candidates)}
        selected.sort(key=lambda nm: order[nm[0]])
    if not selected:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={spec!r} "
            f"(upcycle_norms={config.upcycle_norms}); candidates: {[n for n, _ in candidates][:20]}"
        )
    return selected
