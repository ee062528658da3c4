"""The regularisers of the SIMoE objective (spec §4); the trainer adds them to the NLL.

    L = NLL + Σ_m [λ1_m (d_m - t) + λ2_m (d_m - t)²] + μ · L_orth

Densities are parameter-weighted: a gate on a column of an (out x in) weight counts `out`
parameters, a gate on a norm element counts one."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from simoe.config import SIMoEConfig
from simoe.layer import SIMoELayer


def _layers(layers: Iterable[SIMoELayer] | Iterable[tuple[str, SIMoELayer]]) -> list[SIMoELayer]:
    return [x[1] if isinstance(x, tuple) else x for x in layers]


def expected_density(layers: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected density of each expert [M] and of their union (scalar), differentiable.

    d_m = Σ_gates P(z_m != 0) · params(gate) / total, and the same for the union's gate, which is
    non-zero when any expert's is (:meth:`SIMoELayer.prob_nonzero` gives both, per gate regime).
    With noise-free gates these are the evaluated densities exactly.
    """
    per_expert, union, total = 0.0, 0.0, 0
    for layer in _layers(layers):
        p, p_union = layer.prob_nonzero()  # [M, in], [in]
        w = layer.params_per_gate
        per_expert = per_expert + p.sum(dim=1) * w
        union = union + p_union.sum() * w
        total += layer.weight_shape.numel()
    return per_expert / total, union / total


def constrained_density(layers: Iterable, scope: str) -> torch.Tensor:
    """The densities the Lagrangian constrains: [1] for scope "union", [M] for "expert"."""
    expert, union = expected_density(layers)
    return union.reshape(1) if scope == "union" else expert


@torch.no_grad()
def deterministic_nonzero(layers: Iterable) -> tuple[torch.Tensor, int, int]:
    """Δ entries switched on by the evaluation gates: per expert [M], union, total."""
    per_expert, union, total = 0, 0, 0
    for layer in _layers(layers):
        on = layer.gates_on()
        w = layer.params_per_gate
        per_expert = per_expert + on.sum(dim=1).long() * w
        union += int(on.any(dim=0).sum()) * w
        total += layer.weight_shape.numel()
    return per_expert, union, total


def orthogonality(layers: Iterable) -> torch.Tensor:
    """Mean over expert pairs i < j of the parameter-weighted cosine of E[z_i] and E[z_j].

    Zero when experts use disjoint parameters; one when they are identical.
    """
    gram = None
    for layer in _layers(layers):
        ez = layer.expected_gates()  # [M, in]
        g = (ez * layer.params_per_gate) @ ez.T
        gram = g if gram is None else gram + g
    num_experts = gram.shape[0]
    if num_experts < 2:
        return gram.new_zeros(())
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    i, j = torch.triu_indices(num_experts, num_experts, offset=1, device=gram.device)
    return cosine[i, j].mean()


def target_density(step: int, warmup_steps: int, final_density: float) -> float:
    """Target density t, warmed up linearly from 1.0 (dense) to ``final_density``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return final_density
    return 1.0 + (final_density - 1.0) * step / warmup_steps


def _reverse_grad(grad: torch.Tensor) -> torch.Tensor:
    return -grad


class SparsityLagrangian(nn.Module):
    """λ1 g + λ2 g², summed over constraints, with λ maximised.

    Noise-free gates: g = d - t, an equality (CoFi's form). d is the evaluated density itself,
    and its straight-through gradient reaches gates just below zero too, so when d falls under t
    λ1 turns negative and revives the columns that died last: the density settles *at* t rather
    than overshooting (a budget lets Adam's momentum carry it on down once g = 0).
    Stochastic gates: g = max(d - t, 0), a budget d <= t. Their expected density starts below
    the warm-up's initial target 1.0, and with the equality λ1 went negative and pushed the
    density *up* before the target even fell; the budget settles at d ≈ t from above (tested in
    test_train.py).
    :meth:`release_met` (called after every optimizer step) resets λ1 to 0 where a constraint is
    met but λ1 still pushes past it, as SMAT resets an expert's multiplier once it meets its
    target: without it λ1, wound up while the density lagged the falling warm-up target, keeps
    pushing for as many steps as it took to wind up, and the density overshoots far below t.
    The multipliers' gradients are negated by a hook, so any ordinary optimizer performing
    descent on the total loss performs *ascent* on λ (CoFi pruning uses a negative lr instead,
    which torch's optimizers reject). One pair of λ per expert (scope "expert") or one pair for
    the union of experts (scope "union").
    """

    def __init__(self, num_constraints: int, equality: bool = False):
        super().__init__()
        self.equality = equality
        self.lambda1 = nn.Parameter(torch.zeros(num_constraints))
        self.lambda2 = nn.Parameter(torch.zeros(num_constraints))
        for p in (self.lambda1, self.lambda2):
            p.register_hook(_reverse_grad)
        self.last_gap: torch.Tensor | None = None  # d - t at the last forward

    @torch.no_grad()
    def release_met(self) -> None:
        """λ1 := 0 where the last gap says the constraint is met (d <= t) yet λ1 > 0 still pushes
        the density down, or d >= t yet λ1 < 0 still pushes it up."""
        if self.last_gap is None:
            return
        wrong_way = ((self.last_gap <= 0) & (self.lambda1 > 0)) | ((self.last_gap >= 0) & (self.lambda1 < 0))
        self.lambda1.masked_fill_(wrong_way, 0.0)

    @classmethod
    def for_config(cls, config: SIMoEConfig) -> SparsityLagrangian:
        return cls(1 if config.sparsity_scope == "union" else config.num_experts,
                   equality=config.gate_regime == "noise-free")

    def forward(self, density: torch.Tensor, target: float) -> torch.Tensor:
        gap = density.reshape(-1) - target
        self.last_gap = gap.detach()
        if not self.equality:
            gap = gap.clamp_min(0.0)  # d <= t: a budget, see the docstring
        if gap.numel() != self.lambda1.numel():
            raise ValueError(f"{gap.numel()} densities for {self.lambda1.numel()} constraints")
        return (self.lambda1 * gap + self.lambda2 * gap.pow(2)).sum()


class SIMoERegularizer(nn.Module):
    """Everything the spec adds to the NLL, at one training step:

        Σ [λ1 (d - t) + λ2 (d - t)²] + μ · L_orth,   t warmed up from 1.0 over ``warmup_steps``.

    Holds the multipliers λ (train them with their own learning rate and no weight decay).
    Returns the total and the detached parts for logging.
    """

    def __init__(self, config: SIMoEConfig, warmup_steps: int):
        super().__init__()
        self.config, self.warmup_steps = config, warmup_steps
        self.lagrangian = SparsityLagrangian.for_config(config)

    def forward(self, layers: Iterable, step: int) -> tuple[torch.Tensor, dict]:
        layers = _layers(layers)
        target = target_density(step, self.warmup_steps, self.config.target_density)
        density = constrained_density(layers, self.config.sparsity_scope)
        sparsity = self.lagrangian(density, target)
        orth = orthogonality(layers)
        parts = {"target_density": target, "lagrangian": sparsity.detach(), "orthogonality": orth.detach()}
        return sparsity + self.config.orthogonality_weight * orth, parts


def routing_entropy(routing: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each routing distribution (the last dimension)."""
    return -(routing * routing.clamp_min(1e-12).log()).sum(-1)


def routing_information(routing: torch.Tensor) -> torch.Tensor:
    """I(prompt; expert) over a batch, H(mean r) - mean H(r), in nats: 0 when every prompt has the
    same routing (or a uniform one), ln M when each prompt picks one expert and all are used
    equally. SIMoETrainer adds -router_information_weight times it to the loss."""
    return routing_entropy(routing.mean(dim=0)) - routing_entropy(routing).mean()


def routing_balance(routing: torch.Tensor) -> torch.Tensor:
    """KL(uniform || mean r) over a batch, in nats: 0 when every expert carries 1/M of the routing
    mass, growing without bound as one is starved. Its gradient on a starved expert's logit stays
    about 1/(M τ) however small its share (H(mean r)'s vanishes with the softmax's); SIMoETrainer
    adds router_balance_weight times it to the loss."""
    load = routing.mean(dim=0).clamp_min(1e-12)
    return -math.log(routing.shape[-1]) - load.log().mean()
