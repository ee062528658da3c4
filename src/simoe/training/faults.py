"""Faults: a NaN or infinite gradient stops training before the optimizer step, so it never reaches
the weights, the optimizer state or a checkpoint."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


def first_non_finite(named_grads: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first gradient holding a NaN or an infinity, or None (one host sync)."""
    if not named_grads:
        return None
    sums = torch.stack([g.detach().sum().float() for _, g in named_grads])  # a NaN or inf survives a sum
    if bool(torch.isfinite(sums).all()):
        return None
    return next(name for name, g in named_grads if not bool(torch.isfinite(g).all()))


class StopOnNonFinite(TrainerCallback):
    """Raise FloatingPointError, naming the step and the tensor, when a gradient is not finite.

    fp16 mixed precision is left alone: its loss scaler skips such steps by design.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.fp16 or optimizer is None:
            return
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        grads = [(names.get(id(p), f"group {i} tensor {j}"), p.grad)
                 for i, group in enumerate(optimizer.param_groups)
                 for j, p in enumerate(group["params"]) if p.grad is not None]
        bad = first_non_finite(grads)
        if bad is not None:
            raise FloatingPointError(
                f"step {state.global_step + 1}: the gradient of {bad} is NaN or infinite; training stopped "
                "before the optimizer step, so the weights and every checkpoint written so far are "
                "finite (try a lower learning rate, max_grad_norm, or bf16 instead of fp16)")
