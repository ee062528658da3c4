"""SIMoE layers: a frozen module plus one shared Δ and M structured hard-concrete masks.

For a 2-D weight W0 (out x in) expert m owns one gate per input column, z_m in [0,1]^in.
Given the routing r of one example, the merged weight is

    W(x) = W0 + Δ · diag(m),   m = Σ_m r_m z_m,

and we compute it without ever materialising W(x) per example:

    y = W0 x + b0 + Δ (m ⊙ x).

For a 1-D tensor g (a norm weight) there is one gate per element: g(x) = g0 + m ⊙ Δ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from simoe import hard_concrete


def _columns(x, merged_gates, delta, x_index, index, conv1d):
    """x on its columns ``x_index``, and m and Δ (in x's dtype) on their columns ``index`` (None: all)."""
    if x_index is not None:
        x = x.index_select(-1, x_index)
    if index is not None:
        merged_gates = merged_gates.index_select(-1, index)
        delta = delta.index_select(0 if conv1d else 1, index)
    return x, merged_gates, delta.to(x.dtype)


def _scatter(values, index, shape, dim):
    """Put values computed on the columns ``index`` back into a zero tensor of the full shape."""
    if index is None:
        return values
    return values.new_zeros(shape).index_copy_(dim % len(shape), index, values)


class _MaskedDelta(torch.autograd.Function):
    """Δ (m ⊙ x), computed on the active input columns only, saving x's and m's active columns.

    Two savings over plain autograd. Memory: autograd would keep both x (for m's gradient) and
    m ⊙ x (for Δ's); keeping x's active columns and recomputing m ⊙ x in backward saves one
    activation per layer and three quarters of another at 25 % density. Compute: a column whose
    gate is exactly 0 in every expert contributes nothing, so the extra matmuls run on the active
    columns only: at 25 % union density they cost a quarter. Gradients at inactive columns are
    exactly zero for Δ and x; for m they are dropped, which is exact for the parameters: those
    gates sit in the clamp's flat region, where dz/d log α = 0, and z = 0 there, so the router's
    gradient Σ_col (dL/dm) z gets nothing from them either.
    ``index`` picks the active columns of m and Δ (None: all), ``x_index`` the same columns of x
    (they differ once Δ is compacted: :meth:`SIMoELinear.compact_`).
    Δ comes in as the fp32 parameter and is cast to x's dtype inside, so a bf16 model keeps no
    bf16 copy of Δ for backward.
    """

    @staticmethod
    def forward(ctx, x, merged_gates, delta, x_index, index, conv1d: bool):
        xs, ms, ds = _columns(x, merged_gates, delta, x_index, index, conv1d)
        ctx.save_for_backward(xs, ms, delta, x_index, index)
        ctx.conv1d, ctx.x_shape, ctx.m_shape = conv1d, x.shape, merged_gates.shape
        masked = xs * ms
        return masked @ ds if conv1d else F.linear(masked, ds)

    @staticmethod
    def backward(ctx, grad):
        xs, ms, delta, x_index, index = ctx.saved_tensors
        conv1d = ctx.conv1d
        ds = (delta if index is None else delta.index_select(0 if conv1d else 1, index)).to(xs.dtype)
        grad_masked = grad @ (ds.T if conv1d else ds)
        grad_x = grad_merged = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = _scatter(grad_masked * ms, x_index, ctx.x_shape, -1)
        if ctx.needs_input_grad[1]:
            grad_merged = _scatter((grad_masked * xs).sum_to_size(ms.shape), index, ctx.m_shape, -1)
        if ctx.needs_input_grad[2]:
            masked, grad = (xs * ms).flatten(0, -2), grad.flatten(0, -2)
            grad_delta = _scatter(masked.T @ grad if conv1d else grad.T @ masked, index,
                                  delta.shape, 0 if conv1d else 1).to(delta.dtype)
        return grad_x, grad_merged, grad_delta, None, None, None


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
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
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
        return self.base.weight.numel() // self.in_features

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
    def folded_weight(self, merged_gates: torch.Tensor) -> torch.Tensor:
        """The base weight with one routing's merged experts folded in, a new tensor in the weight's
        dtype: W0 + Δ·diag(m) (Conv1D, weight in x out: diag(m)·Δ; a norm: g0 + m ⊙ Δ), m [in]."""
        weight = self.base.weight
        m = merged_gates.to(torch.float32)
        if self.delta.dim() == 2:  # m along the gated dimension, broadcast over the other
            m = m.unsqueeze(1 - self.column_dim)
        if self.kept is not None:  # Δ holds these columns only (SIMoELinear.compact_)
            return weight.float().index_add(self.column_dim, self.kept, self.delta * m).to(weight.dtype)
        return (weight.float() + self.delta * m).to(weight.dtype)

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

    def _merged_gates_for(self, x: torch.Tensor) -> torch.Tensor:
        """The merged gates m = r @ z shaped to broadcast over x ([batch, ..., in_features])."""
        m = self.merged_gates
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
        self.x_index = self.kept if active is None else active if self.kept is None else self.kept[active]
        self.active_delta = None
        if not self.training and self.active is not None:
            # decoding reads Δ once per token: gather its active columns once per routing instead
            with torch.no_grad():
                self.active_delta = self.delta.index_select(self.column_dim, self.active).to(
                    self.base.weight.dtype)

    @property
    def in_features(self) -> int:
        w = self.base.weight
        return w.shape[0] if isinstance(self.base, Conv1D) else w.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged_gates is None:
            return y
        merged_gates = self._merged_gates_for(x)
        if self.active_delta is not None and not torch.is_grad_enabled():
            masked = x.index_select(-1, self.x_index) * merged_gates.index_select(-1, self.active)
            delta = self.active_delta.to(x.dtype)
            return y + (masked @ delta if self._conv1d else F.linear(masked, delta))
        return y + _MaskedDelta.apply(x, merged_gates, self.delta, self.x_index, self.active, self._conv1d)

    # ---------------------------------------------------------------- compaction
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
        self.merged_gates, self.active, self.x_index, self.active_delta = None, None, None, None

    @torch.no_grad()
    def expand_(self, dropped_logit: float) -> None:
        """Undo :meth:`compact_`: Δ and log α back at the full input width (:meth:`full_tensors`)."""
        self.delta.data, self.log_alpha.data = self.full_tensors(dropped_logit)
        self.delta.grad = self.log_alpha.grad = None
        self.kept = None
        self.merged_gates, self.active, self.x_index, self.active_delta = None, None, None, None


class SIMoENorm(SIMoELayer):
    """Wraps any normalisation layer whose output is affine in its 1-D ``weight``.

    LayerNorm (n(x)·g + b), RMSNorm (n(x)·g) and Gemma's RMSNorm (n(x)·(1 + g)) all are, so
    y(g0 + m⊙Δ) = y(g0) + m⊙Δ⊙A with A = y(1) - y(0): no norm needs its own code path.
    """

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged_gates is None:
            return y
        w = self.base.weight
        slope = functional_call(self.base, {"weight": torch.ones_like(w)}, (x,)) - functional_call(
            self.base, {"weight": torch.zeros_like(w)}, (x,)
        )
        return y + slope * (self._merged_gates_for(x) * self.delta.to(x.dtype))
