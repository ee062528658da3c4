"""SIMoE layers: a frozen module plus one shared Δ and M structured hard-concrete masks.

For a 2-D weight W0 (out x in) expert m owns one gate per input column, z_m in [0,1]^in.
Given the routing r of one example, the merged weight is

    W(x) = W0 + Δ · diag(m),   m = Σ_m r_m z_m,

and we compute it without ever materialising W(x) per example:

    y = W0 x + b0 + Δ (m ⊙ x).

For a 1-D tensor g (a norm weight) there is one gate per element: g(x) = g0 + m ⊙ Δ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from simoe import hard_concrete
from simoe.masked_delta import MaskedDelta, x_columns


def active_columns(gates: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """For each layer's gates [M, in]: the input columns some expert keeps, or None when it keeps all.

    Two host synchronisations for all the layers together (their counts, then their indices), not
    two per layer: on an accelerator each one stalls the queue of launched kernels.
    """
    if not gates:
        return []
    on = [(g != 0).any(dim=0) for g in gates]
    counts = torch.stack([o.sum() for o in on]).tolist()
    index = torch.cat(on).nonzero().squeeze(1)
    active, offset = [], 0
    for part, count, o in zip(index.split(counts), counts, on, strict=True):
        active.append(None if count == o.numel() else part - offset)
        offset += o.numel()
    return active


def _straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, ``surrogate``'s gradient in the backward."""
    return value + (surrogate - surrogate.detach())


class SIMoELayer(nn.Module):
    """Common state of every SIMoE layer: ``base`` (frozen), ``delta`` and ``log_alpha``.

    ``regime`` (``hard_concrete.REGIMES``) decides the gates; every gate the layer hands out comes
    from :func:`hard_concrete.gates`.
    """

    def __init__(self, base: nn.Module, num_experts: int, init_logit: float, init_std: float,
                 regime: str = "noise-free"):
        super().__init__()
        if regime not in hard_concrete.REGIMES:
            raise ValueError(f"gate regime must be one of {hard_concrete.REGIMES}, got {regime!r}")
        self.base = base
        self.regime = regime
        weight = base.weight
        # The weight's full shape, kept: DeepSpeed ZeRO-3 empties a partitioned weight's data (its
        # shape lives on as ds_shape), so nothing below reads the live weight's shape.
        self.weight_shape = torch.Size(getattr(weight, "ds_shape", weight.shape))
        self.delta = nn.Parameter(torch.zeros(self.weight_shape, dtype=torch.float32, device=weight.device))
        log_alpha = torch.full(
            (num_experts, self.in_features), init_logit, dtype=torch.float32, device=weight.device
        )
        self.log_alpha = nn.Parameter(log_alpha + init_std * torch.randn_like(log_alpha))
        # The merged gates m(x) = r(x) @ z for the current batch, [batch, in_features]. SIMoEModel
        # sets it before each forward and leaves it in place afterwards, so that activation
        # checkpointing recomputes this layer with the very gates the forward sampled.
        self.merged_gates: torch.Tensor | None = None
        # The input columns Δ and log α hold, None: all (only SIMoELinear.compact_ drops some).
        self.register_buffer("kept", None, persistent=False)

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def params_per_gate(self) -> int:
        """How many entries of Δ one gate switches: a whole column, or one element."""
        return self.weight_shape.numel() // self.in_features

    def gates(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """[M, in_features]: the training gates in train mode, the evaluation gates in eval mode."""
        return hard_concrete.gates(self.log_alpha, self.regime, self.training, generator)

    def eval_gates(self) -> torch.Tensor:
        """[M, in_features]: the gates evaluation, generation, exports and analyses use."""
        return hard_concrete.gates(self.log_alpha, self.regime, training=False)

    @torch.no_grad()
    def gates_on(self) -> torch.Tensor:
        """[M, in_features] bool: which evaluation gates are non-zero (the columns each expert keeps)."""
        return self.eval_gates() > 0

    def expected_gates(self) -> torch.Tensor:
        """E[z] under the training gates, differentiable (what the orthogonality penalty compares)."""
        if self.regime == "noise-free":
            return hard_concrete.noise_free(self.log_alpha)
        return hard_concrete.expected(self.log_alpha)

    def prob_nonzero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P(z != 0) under the training gates, per expert [M, in] and for their union [in].

        Stochastic: the closed form, and 1 - Π_m (1 - p_m) for the union (independent gates).
        Noise-free: the gate is a function of log α, so the probability is 0 or 1 (the
        evaluated density exactly); its gradient is the stochastic form's, sigmoid(log α - θ),
        straight through, and the union's is their sum over experts, which pushes every expert
        that keeps a column (the product's gradient would vanish once another expert is on).
        """
        if self.regime == "stochastic":
            p = hard_concrete.prob_nonzero(self.log_alpha)
            return p, 1.0 - torch.prod(1.0 - p, dim=0)
        on = self.gates_on().to(self.log_alpha.dtype)
        soft = hard_concrete.prob_nonzero(self.log_alpha)
        return _straight_through(on, soft), _straight_through(on.amax(dim=0), soft.sum(dim=0))

    def set_routing(self, routing: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the experts for a batch: m = r @ z, with ``gates`` z drawn by :meth:`gates`.

        Returns the gates used.
        """
        return self.merge_experts(routing, gates)

    def merge_experts(self, routing: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """m = r @ z for a batch (what :meth:`set_routing` does for every layer kind); returns z."""
        gates = self.gates() if gates is None else gates
        self.merged_gates = routing @ gates
        return gates

    @property
    def column_dim(self) -> int:
        """The dimension of Δ that a gate indexes: Linear [out, in] -> 1; Conv1D [in, out], norms -> 0."""
        return 1 if self.delta.dim() == 2 and not isinstance(self.base, Conv1D) else 0

    @torch.no_grad()
    def fold_(self, merged_gates: torch.Tensor, in_place: bool = True) -> Callable[[], None]:
        """Make the base weight W0 + Δ·diag(m) for one routing's merged gates m [Δ's columns]; returns
        the function that puts W0 back, bit for bit. In place, on the columns where m ≠ 0 only (work
        and memory ∝ density); ``in_place=False`` (a weight another module shares, e.g. tied) swaps
        in a new tensor from :meth:`folded_weight` instead."""
        weight = self.base.weight
        if not in_place:
            self.base.weight = nn.Parameter(self.folded_weight(merged_gates), requires_grad=False)
            return lambda: setattr(self.base, "weight", weight)
        dim = self.column_dim
        columns = merged_gates.nonzero().squeeze(1)
        weight_columns = x_columns(self.kept, columns)
        original = weight.index_select(dim, weight_columns)
        m = self._along_columns(merged_gates[columns].float())
        folded = original.float() + self.delta.index_select(dim, columns) * m
        weight.index_copy_(dim, weight_columns, folded.to(weight.dtype))
        return lambda: weight.index_copy_(dim, weight_columns, original)

    @torch.no_grad()
    def folded_weight(self, merged_gates: torch.Tensor) -> torch.Tensor:
        """The base weight with one routing's merged experts folded in, a new tensor in the weight's
        dtype: W0 + Δ·diag(m) (Conv1D, weight in x out: diag(m)·Δ; a norm: g0 + m ⊙ Δ), m [in]."""
        weight = self.base.weight
        m = self._along_columns(merged_gates.to(torch.float32))
        if self.kept is not None:  # Δ holds these columns only (SIMoELinear.compact_)
            return weight.float().index_add(self.column_dim, self.kept, self.delta * m).to(weight.dtype)
        return (weight.float() + self.delta * m).to(weight.dtype)

    def _along_columns(self, m: torch.Tensor) -> torch.Tensor:
        """A vector over Δ's gated columns, shaped to broadcast against Δ (along the gated dimension)."""
        return m.unsqueeze(1 - self.column_dim) if self.delta.dim() == 2 else m

    def full_tensors(self, dropped_logit: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ and log α at the full input width: columns dropped by ``SIMoELinear.compact_`` get Δ = 0
        and log α = ``dropped_logit`` (a gate of 0). The parameters themselves when none were."""
        if self.kept is None:
            return self.delta, self.log_alpha
        shape = list(self.delta.shape)
        shape[self.column_dim] = self.in_features
        delta, log_alpha = self.delta.detach(), self.log_alpha.detach()
        full_delta = delta.new_zeros(shape).index_copy_(self.column_dim, self.kept, delta)
        full_log_alpha = log_alpha.new_full((log_alpha.shape[0], self.in_features), dropped_logit)
        return full_delta, full_log_alpha.index_copy_(1, self.kept, log_alpha)

    def _merged_gates_for(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """The merged gates m = r @ z (or ``m``, some of their columns) shaped to broadcast over x
        ([batch, ..., columns])."""
        m = self.merged_gates if m is None else m
        if x.shape[0] != m.shape[0]:
            # generate() with num_beams / num_return_sequences repeats each prompt in place.
            if x.shape[0] % m.shape[0]:
                raise RuntimeError(
                    f"batch of {x.shape[0]} cannot be matched to routing for {m.shape[0]} examples"
                )
            m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)
        return m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[-1]).to(x.dtype)


class SIMoELinear(SIMoELayer):
    """Wraps ``nn.Linear`` (weight out x in) or GPT-2's ``Conv1D`` (weight in x out).

    :meth:`compact_` can drop the input columns that every expert gates off from Δ and log α for
    good (memory and optimizer state ∝ density); ``kept`` then lists the input columns that remain.
    """

    def __init__(self, base: nn.Linear | Conv1D, num_experts: int, init_logit: float,
                 init_std: float, regime: str = "noise-free"):
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"SIMoELinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        super().__init__(base, num_experts, init_logit, init_std, regime)
        self.active: torch.Tensor | None = None  # Δ's columns with a non-zero gate; None: all
        self.x_index: torch.Tensor | None = None  # the input columns they read; None: all
        self.active_delta: torch.Tensor | None = None  # eval mode: Δ on them, gathered once
        self.active_merged_gates: torch.Tensor | None = None  # eval mode: m on them, gathered once

    @property
    def _conv1d(self) -> bool:
        return isinstance(self.base, Conv1D)

    def set_routing(self, routing: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        gates = self.merge_experts(routing, gates)
        self.set_active(active_columns([gates])[0])
        return gates

    def set_active(self, active: torch.Tensor | None) -> None:
        """Δ's columns some expert keeps (:func:`active_columns`; None: all), and in eval mode Δ
        gathered on them."""
        self.active = active
        self.x_index = x_columns(self.kept, active)
        self.active_delta = self.active_merged_gates = None
        if not self.training and self.active is not None:
            # decoding reads Δ and m once per token: gather their active columns once per routing
            with torch.no_grad():
                self.active_delta = self.delta.index_select(self.column_dim, self.active).to(
                    self.base.weight.dtype)
                self.active_merged_gates = self.merged_gates.index_select(-1, self.active)

    @property
    def in_features(self) -> int:
        return self.weight_shape[0] if isinstance(self.base, Conv1D) else self.weight_shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged_gates is None:
            return y
        if self.active_delta is not None and not torch.is_grad_enabled():
            masked = x.index_select(-1, self.x_index) * self._merged_gates_for(x, self.active_merged_gates)
            delta = self.active_delta.to(x.dtype)
            return y + (masked @ delta if self._conv1d else F.linear(masked, delta))
        return y + MaskedDelta.apply(x, self._merged_gates_for(x), self.delta, self.kept, self.active,
                                     self._conv1d)

    # ---------------------------------------------------------------- compaction
    def _forget_routing(self) -> None:
        """Drop the merged gates and what was gathered for them (set_routing sets them again)."""
        self.merged_gates, self.active, self.x_index = None, None, None
        self.active_delta = self.active_merged_gates = None

    @torch.no_grad()
    def compact_(self, keep: torch.Tensor) -> None:
        """Keep only Δ's and log α's columns ``keep`` (sorted indices into their current columns).

        The parameters stay the same objects (an optimizer holding them keeps working; its state
        must be indexed the same way: ``simoe.training.compaction``). The dropped columns are gone
        for good: the layer computes as if their gates were 0, which is exact when every expert
        gates them off. Their gradients, which the sparsity constraint's straight-through estimate
        would give them, are gone too, so they cannot come back on.
        """
        width = self.delta.shape[self.column_dim]
        if keep.dim() != 1 or (keep.numel() and not 0 <= int(keep.min()) <= int(keep.max()) < width):
            raise ValueError(f"keep must be a 1-D index of Δ's {width} columns")
        keep = keep.to(self.delta.device)
        self.delta.data = self.delta.data.index_select(self.column_dim, keep)
        self.log_alpha.data = self.log_alpha.data.index_select(1, keep)
        self.delta.grad = self.log_alpha.grad = None
        self.kept = keep if self.kept is None else self.kept[keep]
        self._forget_routing()

    @torch.no_grad()
    def expand_(self, dropped_logit: float) -> None:
        """Undo :meth:`compact_`: Δ and log α back at the full input width (:meth:`full_tensors`)."""
        self.delta.data, self.log_alpha.data = self.full_tensors(dropped_logit)
        self.delta.grad = self.log_alpha.grad = None
        self.kept = None
        self._forget_routing()


class SIMoENorm(SIMoELayer):
    """Wraps any normalisation layer whose output is affine in its 1-D ``weight``.

    LayerNorm (n(x)·g + b), RMSNorm (n(x)·g) and Gemma's RMSNorm (n(x)·(1 + g)) all are, so
    y(g0 + m⊙Δ) = y(g0) + m⊙Δ⊙A with A = y(1) - y(0): no norm needs its own code path. A norm that
    broadcasts its weight (RMSNorm's ``weight * x``) takes each example's g0 + m⊙Δ directly, in one
    forward instead of three (``per_example_weight``, probed once when the layer is built).
    """

    def __init__(self, base: nn.Module, num_experts: int, init_logit: float, init_std: float,
                 regime: str = "noise-free"):
        super().__init__(base, num_experts, init_logit, init_std, regime)
        self.per_example_weight = _takes_per_example_weight(base, self.in_features)

    @property
    def in_features(self) -> int:
        return self.weight_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_gates is None:
            return self.base(x)
        w = self.base.weight
        shift = self._merged_gates_for(x) * self.delta.to(x.dtype)
        if self.per_example_weight:
            return functional_call(self.base, {"weight": w.to(x.dtype) + shift}, (x,))
        slope = functional_call(self.base, {"weight": torch.ones_like(w)}, (x,)) - functional_call(
            self.base, {"weight": torch.zeros_like(w)}, (x,)
        )
        return self.base(x) + slope * shift


@torch.no_grad()
def _takes_per_example_weight(norm: nn.Module, size: int) -> bool:
    """Whether ``norm`` given a weight [batch, 1, n] normalises each example with its own weight, as
    RMSNorm's ``weight * x`` does (``F.layer_norm`` insists on a weight of the normalised shape)."""
    w = norm.weight
    if w.is_meta:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, generator=g).to(w.device, w.dtype)
    weights = (1 + torch.randn(2, 1, size, generator=g)).to(w.device, w.dtype)
    try:
        y = functional_call(norm, {"weight": weights}, (x,))
    except (RuntimeError, ValueError, TypeError):
        return False
    each = torch.cat([functional_call(norm, {"weight": weights[b, 0]}, (x[b : b + 1],)) for b in range(2)])
    return y.shape == each.shape and torch.allclose(y, each)
