"""The prompt router: one per model, it maps a prompt to its routing r(x), a point of the simplex.

It reads a fixed-size summary of the *prompt* tokens only (never the response, never padding),
is computed once per sequence and held fixed for every position, in training and generation.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [batch, seq, d] over the positions where ``mask`` [batch, seq] is 1."""
    counts = mask.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"example(s) {empty} of the batch have no prompt tokens to route on")
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / counts.to(hidden.dtype).unsqueeze(-1)


def skip_template(
    input_ids: torch.Tensor, mask: torch.Tensor, prefix: list[int] | None, suffix: list[int] | None
) -> torch.Tensor:
    """``mask`` [batch, seq] without the chat template's fixed ``prefix`` and ``suffix`` tokens.

    The prefix is dropped where it starts a row's masked span, the suffix where it ends it (rows
    may be left- or right-padded); a row where either is absent (e.g. cut by truncation) keeps
    those tokens. A row left with nothing to read keeps its whole span.
    """
    mask = mask.long()
    keep = mask.clone()
    seq = mask.shape[1]
    positions = torch.arange(seq, device=mask.device)
    for ids, at_start in ((prefix, True), (suffix, False)):
        if not ids or len(ids) > seq:
            continue
        n = len(ids)
        if at_start:
            first = mask.argmax(dim=1)
        else:
            first = seq - mask.flip(1).argmax(dim=1) - n  # the last n masked positions
        index = (first[:, None] + torch.arange(n, device=mask.device)).clamp(0, seq - 1)
        target = torch.tensor(ids, device=input_ids.device, dtype=input_ids.dtype)
        match = (input_ids.gather(1, index) == target).all(dim=1) & mask.gather(1, index).bool().all(dim=1)
        match &= first >= 0
        span = (positions[None] >= first[:, None]) & (positions[None] < first[:, None] + n)
        keep = keep * ~(span & match[:, None])
    empty = keep.sum(dim=1) == 0
    return torch.where(empty[:, None], mask, keep)


class Router(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear(M), then softmax(logits / τ)."""

    def __init__(self, input_size: int, num_experts: int, hidden_size: int, temperature: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(input_size),
            nn.Linear(input_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, num_experts),
        )
        # Small output weights: routing starts near uniform, so every expert gets gradient.
        nn.init.normal_(self.net[-1].weight, std=0.01)
        nn.init.zeros_(self.net[-1].bias)
        # τ is state, not a hyper-parameter: annealed during training and saved with the model.
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features.float())
        return torch.softmax(logits / self.temperature, dim=-1)
