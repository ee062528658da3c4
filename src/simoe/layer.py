"""SIMoE layers: a frozen module plus one shared Δ and M structured hard-concrete masks.

For a 2-D weight W0 (out x in) expert m owns one gate per input column, z_m in [0,1]^in.
Given the router's coefficients r for one example, the merged weight is

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


class _MaskedDelta(torch.autograd.Function):
    """Δ (m ⊙ x) that saves x and m for backward instead of the masked copy m ⊙ x.

    Autograd would keep both x (for m's gradient) and m ⊙ x (for Δ's); recomputing the latter
    in backward saves one activation per upcycled linear for one cheap multiply.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mix: torch.Tensor, delta: torch.Tensor, conv1d: bool):
        ctx.save_for_backward(x, mix, delta)
        ctx.conv1d = conv1d
        masked = x * mix
        return masked @ delta if conv1d else F.linear(masked, delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mix, delta = ctx.saved_tensors
        grad_masked = grad @ (delta.T if ctx.conv1d else delta)
        grad_x = grad_masked * mix if ctx.needs_input_grad[0] else None
        grad_mix = (grad_masked * x).sum_to_size(mix.shape) if ctx.needs_input_grad[1] else None
        grad_delta = None
        if ctx.needs_input_grad[2]:
            masked, grad = (x * mix).flatten(0, -2), grad.flatten(0, -2)
            grad_delta = masked.T @ grad if ctx.conv1d else grad.T @ masked
        return grad_x, grad_mix, grad_delta, None


class SIMoELayer(nn.Module):
    """Common state of every SIMoE layer: ``base`` (frozen), ``delta`` and ``log_alpha``."""

    def __init__(self, base: nn.Module, num_experts: int, init_logit: float, init_std: float):
        super().__init__()
        self.base = base
        weight = base.weight
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        log_alpha = torch.full(
            (num_experts, self.in_features), init_logit, dtype=torch.float32, device=weight.device
        )
        self.log_alpha = nn.Parameter(log_alpha + init_std * torch.randn_like(log_alpha))
        # The merged mask m(x) = r(x) @ z for the current batch, [batch, in_features]. SIMoEModel
        # sets it before each forward and leaves it in place afterwards, so that activation
        # checkpointing recomputes this layer with the very gates the forward sampled.
        self.mix: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def params_per_gate(self) -> int:
        """How many entries of Δ one gate switches: a whole column, or one element."""
        return self.base.weight.numel() // self.in_features

    def gates(self) -> torch.Tensor:
        """[M, in_features]: sampled while training, deterministic in eval."""
        if self.training:
            return hard_concrete.sample(self.log_alpha)
        return hard_concrete.deterministic(self.log_alpha)

    def _mix_for(self, x: torch.Tensor) -> torch.Tensor:
        """The merged mask shaped to broadcast over x ([batch, ..., in_features])."""
        mix = self.mix
        if x.shape[0] != mix.shape[0]:
            # generate() with num_beams / num_return_sequences repeats each prompt in place.
            if x.shape[0] % mix.shape[0]:
                raise RuntimeError(
                    f"batch of {x.shape[0]} cannot be matched to routing for {mix.shape[0]} examples"
                )
            mix = mix.repeat_interleave(x.shape[0] // mix.shape[0], dim=0)
        return mix.view(mix.shape[0], *([1] * (x.dim() - 2)), mix.shape[-1]).to(x.dtype)


class SIMoELinear(SIMoELayer):
    """Wraps ``nn.Linear`` (weight out x in) or GPT-2's ``Conv1D`` (weight in x out)."""

    def __init__(self, base: nn.Linear | Conv1D, num_experts: int, init_logit: float,
                 init_std: float):
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"SIMoELinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        super().__init__(base, num_experts, init_logit, init_std)

    @property
    def in_features(self) -> int:
        w = self.base.weight
        return w.shape[0] if isinstance(self.base, Conv1D) else w.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.mix is None:
            return y
        delta = self.delta.to(x.dtype)
        return y + _MaskedDelta.apply(x, self._mix_for(x), delta, isinstance(self.base, Conv1D))


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
        if self.mix is None:
            return y
        w = self.base.weight
        slope = functional_call(self.base, {"weight": torch.ones_like(w)}, (x,)) - functional_call(
            self.base, {"weight": torch.zeros_like(w)}, (x,)
        )
        return y + slope * (self._mix_for(x) * self.delta.to(x.dtype))
