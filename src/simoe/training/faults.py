"""Faults: a NaN or infinite gradient stops training before the optimizer step, so it never reaches
the weights, the optimizer state or a checkpoint."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


def first_non_finite(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The first of ``params`` whose gradient holds a NaN or an infinity, or None (one host sync)."""
    if not params:
        return None
    sums = torch.stack([p.grad.detach().sum().float() for p in params])  # a NaN or inf survives a sum
    if bool(torch.isfinite(sums).all()):
        return None
    return next(p for p in params if not bool(torch.isfinite(p.grad).all()))


class StopOnNonFinite(TrainerCallback):
    """Raise FloatingPointError, naming the step and the tensor, when a gradient is not finite.

    fp16 mixed precision is left alone: its loss scaler skips such steps by design.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.fp16 or optimizer is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = first_non_finite(params)
        if bad is not None:  # names are looked up only now, not on every step
            names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
            name = names.get(id(bad), "a tensor outside the model")
            raise FloatingPointError(
                f"step {state.global_step + 1}: the gradient of {name} is NaN or infinite; training stopped "
                "before the optimizer step, so the weights and every checkpoint written so far are "
                "finite (try a lower learning rate, max_grad_norm, or bf16 instead of fp16)")
