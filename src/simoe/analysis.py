"""Analyses of a trained SIMoE model: how the router spreads task groups over the experts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simoe.data import render_prompt
from simoe.generation import eval_mode, pad_left, split_record
from simoe.model import SIMoEModel


@torch.no_grad()
def mean_routing_by_group(
    model: SIMoEModel, tokenizer, records: Sequence[dict], batch_size: int = 32
) -> dict[str, list[float]]:
    """Mean router coefficients [M] of every ``group``, from each record's prompt alone.

    The prompt is rendered as for generation (:func:`simoe.data.render_prompt`); every prompt token
    counts for the router (prompt_mask = the prompt's attention mask). Groups come in the order
    they first appear in ``records``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = []
    for i, record in enumerate(records):
        group = record.get("group") if isinstance(record, dict) else None
        if not isinstance(group, str) or not group:
            raise ValueError(f"record {i}: field 'group' must be a non-empty string")
        groups.append(group)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with eval_mode(model):
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            ids, mask = pad_left([render_prompt(tokenizer, split_record(r, start + j)[0])
                                  for j, r in enumerate(batch)], pad_id)
            mask = mask.to(device)
            routing = model.route(ids.to(device), mask, prompt_mask=mask).double().cpu()
            for group, row in zip(groups[start:start + batch_size], routing, strict=True):
                sums[group] = sums.get(group, 0) + row
                counts[group] = counts.get(group, 0) + 1
    return {group: (sums[group] / counts[group]).tolist() for group in sums}


def plot_routing_heatmap(
    mean_routing: dict[str, list[float]],
    path: str | os.PathLike,
    title: str = "Mean router coefficient per task group",
) -> Path:
    """Save a heatmap (groups as rows, experts E0.. as columns) to ``path`` (PNG) and the same
    numbers to ``path.with_suffix(".json")``; returns the PNG's path.
    """
    if not mean_routing:
        raise ValueError("mean_routing is empty: nothing to plot")
    widths = {len(row) for row in mean_routing.values()}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every group needs the same, non-zero number of experts; got {sorted(widths)}")
    groups = list(mean_routing)
    data = np.array([mean_routing[g] for g in groups], dtype=float)
    n_groups, n_experts = data.shape

    fig = Figure(figsize=(2.5 + 0.75 * n_experts, 1.5 + 0.45 * n_groups), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend switch
    ax = fig.add_subplot()
    # vmin 0: a coefficient is a share of the prompt's routing; the top is the largest share seen.
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(n_experts), [f"E{m}" for m in range(n_experts)])
    ax.set_yticks(range(n_groups), groups)
    ax.set_xlabel("expert")
    ax.set_title(title)
    threshold = 0.6 * float(data.max())
    for g in range(n_groups):
        for m in range(n_experts):
            value = data[g, m]
            # dark text on the bright end of viridis, white on the dark end, so every cell reads
            ax.text(m, g, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > threshold else "white")
    fig.colorbar(image, ax=ax, label="mean router coefficient")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    with open(path.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump({g: [float(v) for v in mean_routing[g]] for g in groups}, f, indent=2)
        f.write("\n")
    return path
