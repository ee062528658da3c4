"""Δ (m ⊙ x) on the active input columns only: the autograd function behind ``SIMoELinear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def x_columns(kept: torch.Tensor | None, active: torch.Tensor | None) -> torch.Tensor | None:
    """The input columns x is read on: Δ's active columns (indices into Δ's ``kept`` columns when it
    is compacted, else into x's), mapped to x's columns; None: all of them."""
    if kept is None:
        return active
    return kept if active is None else kept[active]


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


class MaskedDelta(torch.autograd.Function):
    """Δ (m ⊙ x), computed on the active input columns only, saving x's and m's active columns.

    Two savings over plain autograd. Memory: autograd would keep both x (for m's gradient) and
    m ⊙ x (for Δ's); keeping x's active columns and recomputing m ⊙ x in backward saves one
    activation per layer and three quarters of another at 25 % density. Compute: a column whose
    gate is exactly 0 in every expert contributes nothing, so the extra matmuls run on the active
    columns only: at 25 % union density they cost a quarter. Gradients at inactive columns are
    exactly zero for Δ and x; for m they are dropped, which is exact for the parameters: those
    gates sit in the clamp's flat region, where dz/d log α = 0, and z = 0 there, so the router's
    gradient Σ_col (dL/dm) z gets nothing from them either.
    ``active`` picks the active columns of m and Δ (None: all); ``kept``, for a compacted Δ
    (:meth:`SIMoELinear.compact_`), the input columns Δ's columns stand for (:func:`x_columns`).
    Δ comes in as the fp32 parameter and is cast to x's dtype inside, so a bf16 model keeps no
    bf16 copy of Δ for backward.
    """

    @staticmethod
    def forward(ctx, x, merged_gates, delta, kept, active, conv1d: bool):
        x_index, index = x_columns(kept, active), active
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
