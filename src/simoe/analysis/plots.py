"""The analyses' figures, each written as a PNG beside a JSON of the same numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from scipy.cluster.hierarchy import dendrogram

from simoe.analysis.compute import (
    LINKAGE_METHOD,
    LINKAGE_METRIC,
    OTHER_DEPTH,
    OVERLAP_METRIC,
    cluster_groups,
    routing_matrix,
)
from simoe.io import save_json

MAX_ANNOTATED = 16  # cells are annotated with their value up to this many experts


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend switch
    return fig


def _save(fig: Figure, path: str | os.PathLike, payload: dict) -> Path:
    """Write ``fig`` to ``path`` (PNG) and ``payload`` to the same path with a .json suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    save_json(payload, path.with_suffix(".json"), ensure_ascii=False)
    return path


def _annotate(ax, data: np.ndarray, vmax: float, fmt: str = "{:.2f}", fontsize: float = 8) -> None:
    """Write every cell's value on an imshow heatmap, legible on both ends of viridis."""
    for (row, col), value in np.ndenumerate(data):
        ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                color="black" if value > 0.6 * vmax else "white")


def plot_routing_heatmap(
    mean_routing: dict[str, list[float]],
    path: str | os.PathLike,
    title: str = "Mean routing per task group",
) -> dict:
    """Heatmap of the mean routing (groups as rows in dendrogram order, experts E0.. as columns),
    with the dendrogram on the left, saved to ``path`` (PNG).

    Returns what is written to ``path.with_suffix(".json")``: :func:`cluster_groups`'s fields plus
    ``experts`` and ``mean_routing`` ({group: [M shares]}, in input order).
    """
    clusters = cluster_groups(mean_routing)
    groups, data = routing_matrix(mean_routing)
    order = clusters["order"]
    n_groups, n_experts = data.shape
    shown = data[order]

    many = n_groups > 30  # smaller rows and type beyond 30 groups, so 100+ tasks stay one page
    row_h, label_size = (0.22, 6) if many else (0.4, 9)
    longest = max(len(g) for g in groups)
    label_width = 0.6 * label_size / 72 * longest  # inches: a character is about 0.6 em wide
    width = 1.8 + 0.55 * n_experts + label_width + 1.4
    fig = _new_figure(max(6.0, width), max(2.8, 1.6 + row_h * n_groups))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 0.55 * n_experts], wspace=0.0)
    ax_tree, ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])

    vmax = max(float(data.max()), 1e-9)  # vmin 0: each entry is a share of the prompt's routing
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_experts), [f"E{m}" for m in range(n_experts)])
    ax.set_yticks(range(n_groups), [groups[i] for i in order], fontsize=label_size)
    ax.yaxis.tick_right()  # labels right of the heatmap, so the dendrogram touches its rows
    ax.set_xlabel("expert")
    if n_experts <= MAX_ANNOTATED and not many:
        _annotate(ax, shown, vmax)
    # a colour bar of at most ~6 inches, however many rows
    fig.colorbar(image, ax=ax, label="mean share of the routing", location="right", pad=0.02,
                 shrink=min(0.9, 6.0 / fig.get_figheight()))

    if n_groups > 1:
        # scipy puts leaf i at y = 5 + 10 i (bottom up); flip the axis so leaf 0 sits on row 0 (top)
        dendrogram(np.array(clusters["linkage"]), orientation="left", ax=ax_tree, no_labels=True,
                   link_color_func=lambda _: "0.25")
        ax_tree.set_ylim(10 * n_groups, 0)
        ax_tree.set_xlabel(f"{LINKAGE_METHOD} {LINKAGE_METRIC}\ndistance", fontsize=8)
        ax_tree.tick_params(axis="x", labelsize=7)
        for side in ("left", "top", "right"):
            ax_tree.spines[side].set_visible(False)
    else:
        ax_tree.set_axis_off()
        ax_tree.text(0.5, 0.5, "one group:\nnothing to cluster", ha="center", va="center", fontsize=9,
                     transform=ax_tree.transAxes)
    fig.suptitle(f"{title}\n(rows clustered: {LINKAGE_METHOD} linkage, {LINKAGE_METRIC} distance)",
                 fontsize=11)

    payload = {**clusters, "experts": [f"E{m}" for m in range(n_experts)],
               "mean_routing": {g: [float(v) for v in mean_routing[g]] for g in groups}}
    _save(fig, path, payload)
    return payload


def plot_expert_overlap(
    overlap: np.ndarray, path: str | os.PathLike, title: str = "Mask overlap between experts"
) -> dict:
    """Annotated M x M heatmap of :func:`expert_overlap` saved to ``path`` (PNG).

    Returns what is written to ``path.with_suffix(".json")``: ``metric``, ``experts``, ``overlap``.
    """
    overlap = np.asarray(overlap, dtype=float)
    if overlap.ndim != 2 or overlap.shape[0] != overlap.shape[1] or overlap.shape[0] == 0:
        raise ValueError(f"overlap must be a non-empty square matrix, got shape {overlap.shape}")
    n = overlap.shape[0]
    labels = [f"E{m}" for m in range(n)]
    fig = _new_figure(2.6 + 0.55 * n, 1.9 + 0.5 * n)
    ax = fig.add_subplot()
    image = ax.imshow(overlap, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    if n <= MAX_ANNOTATED:
        _annotate(ax, overlap, 1.0)
    fig.colorbar(image, ax=ax, label="overlap", shrink=0.9)
    ax.set_title(f"{title}\n{OVERLAP_METRIC}\n(evaluation gates)", fontsize=10)
    payload = {"metric": OVERLAP_METRIC, "experts": labels, "overlap": overlap.tolist()}
    _save(fig, path, payload)
    return payload


def plot_nonzero_share(
    share: dict, path: str | os.PathLike, title: str = "Non-zero share of the upcycled parameters"
) -> dict:
    """Two bar charts (by layer depth, by module type) of :func:`nonzero_share` saved to ``path``.

    Bars are the union of the experts; dots are the single experts; the dashed line is the target
    density. Returns ``share``, which is also written to ``path.with_suffix(".json")``.
    """
    depth, types = share["by_depth"], share["by_type"]
    fig = _new_figure(max(7.0, 1.5 + 0.28 * len(depth) + 0.55 * len(types)), 4.2)
    grid = fig.add_gridspec(1, 2, width_ratios=[max(len(depth), 4), max(len(types), 3) * 1.3])
    highest = max([share["target_density"]] + [max(b["share"], *b["experts"])
                                                 for b in (*depth.values(), *types.values())])
    top = min(1.02, 1.15 * highest + 0.02)  # both panels on one scale, no empty top at 25 % density
    for ax, buckets, xlabel in (
        (fig.add_subplot(grid[0]), depth, "decoder layer"),
        (fig.add_subplot(grid[1]), types, "module type"),
    ):
        x = np.arange(len(buckets))
        ax.bar(x, [b["share"] for b in buckets.values()], color="tab:blue", alpha=0.75,
               label="union of experts")
        for i, b in enumerate(buckets.values()):
            ax.scatter(np.full(len(b["experts"]), i), b["experts"], s=9, color="black", zorder=3,
                       label="single expert" if i == 0 else None)
        ax.axhline(share["target_density"], color="tab:red", linestyle="--", linewidth=1,
                   label="target density")
        names = ["outside\nlayers" if k == OTHER_DEPTH and buckets is depth else k for k in buckets]
        ax.set_xticks(x, names, fontsize=8 if len(buckets) > 20 else 9)
        ax.set_xlim(-0.6, len(buckets) - 0.4)
        ax.set_ylim(0, top)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].set_ylabel("non-zero Δ entries / upcycled entries")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    overall = share["overall"]["share"]
    fig.suptitle(f"{title} (evaluation gates; overall {overall:.1%})", fontsize=11)
    _save(fig, path, share)
    return share

