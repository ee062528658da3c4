"""The paper's analyses of a trained SIMoE model, each written as a PNG and a JSON of the same numbers.

1. How the router spreads task groups over the experts: the mean routing per group, as a
   heatmap whose rows follow a hierarchical clustering of the groups (dendrogram beside it).
2. How much the experts' masks overlap: parameter-weighted Jaccard index of the evaluation gates.
3. Where upcycling keeps parameters: the share of non-zero Δ entries by layer depth and module type.

:func:`analyze` runs all three; ``simoe analyze`` calls it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from scipy.cluster.hierarchy import dendrogram, leaves_list, linkage

from simoe.data import pad_id_of, render_prompt
from simoe.generation import eval_mode, pad_left, split_record
from simoe.io import save_json
from simoe.layer import SIMoENorm
from simoe.model import SIMoEModel

# Average linkage (UPGMA) on Euclidean distance: routing rows all lie on the simplex, so plain
# distance compares them directly; identical rows are at distance 0 and merge first.
LINKAGE_METHOD, LINKAGE_METRIC = "average", "euclidean"
OVERLAP_METRIC = "parameter-weighted Jaccard |A∩B| / |A∪B|"
OTHER_DEPTH = "other"  # bucket of upcycled modules outside the decoder layers (e.g. the final norm)
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


# ---------------------------------------------------------------------------- 1. routing by group
@torch.no_grad()
def routing_by_record(
    model: SIMoEModel, tokenizer, records: Sequence[dict], batch_size: int = 32
) -> tuple[list[str], torch.Tensor]:
    """Every record's ``group`` and routing [N, M], from its prompt alone.

    The prompt is rendered as for generation (:func:`simoe.data.render_prompt`) and routed as
    generation routes it (``model.route`` on the prompt's tokens).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = []
    for i, record in enumerate(records):
        group = record.get("group") if isinstance(record, dict) else None
        if not isinstance(group, str) or not group:
            raise ValueError(f"record {i}: field 'group' must be a non-empty string")
        groups.append(group)
    pad_id = pad_id_of(tokenizer, model)
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model):
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            ids, mask = pad_left([render_prompt(tokenizer, split_record(r, start + j)[0])
                                  for j, r in enumerate(batch)], pad_id)
            rows.append(model.route(ids.to(device), mask.to(device)).double().cpu())
    return groups, torch.cat(rows)


def mean_routing_by_group(
    model: SIMoEModel, tokenizer, records: Sequence[dict], batch_size: int = 32
) -> dict[str, list[float]]:
    """The mean routing [M] of every ``group`` (:func:`routing_by_record`), in the order
    the groups first appear in ``records``."""
    return mean_by_group(*routing_by_record(model, tokenizer, records, batch_size))


def mean_by_group(groups: Sequence[str], routing: torch.Tensor) -> dict[str, list[float]]:
    """The mean routing [M] of every group, in the order the groups first appear."""
    order = list(dict.fromkeys(groups))
    index = torch.tensor([order.index(g) for g in groups])
    return {g: routing[index == i].mean(dim=0).tolist() for i, g in enumerate(order)}


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def routing_specialisation(groups: Sequence[str], routing: torch.Tensor) -> dict:
    """How the router divides prompts among experts.

    ``load``: each expert's share of the mean routing mass; ``top_expert_share``: the share of
    prompts whose largest share of the routing is that expert's; ``nmi``: normalised mutual information
    between the prompts' groups and their top experts, I / ((H(group) + H(expert)) / 2) (the
    arithmetic normalisation, as scikit-learn's default): 0 when the top expert says nothing
    about the group, 1 when the two determine each other.
    """
    if len(groups) != routing.shape[0] or not len(groups):
        raise ValueError(f"{len(groups)} groups for {routing.shape[0]} routings")
    names = sorted(set(groups))
    g = np.array([names.index(x) for x in groups])
    top = routing.argmax(dim=1).numpy()
    m = routing.shape[1]
    joint = np.zeros((len(names), m))
    np.add.at(joint, (g, top), 1)
    h_group, h_top = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    mutual = h_group + h_top - _entropy(joint.ravel())
    mean = (h_group + h_top) / 2
    return {
        "load": (routing.mean(dim=0) / routing.mean(dim=0).sum()).tolist(),
        "top_expert_share": (joint.sum(0) / joint.sum()).tolist(),
        "nmi": float(mutual / mean) if mean > 0 else 0.0,
    }


def _routing_matrix(mean_routing: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
    if not mean_routing:
        raise ValueError("mean_routing is empty: nothing to plot")
    widths = {len(row) for row in mean_routing.values()}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every group needs the same, non-zero number of experts; got {sorted(widths)}")
    groups = list(mean_routing)
    return groups, np.array([mean_routing[g] for g in groups], dtype=float)


def cluster_groups(mean_routing: dict[str, list[float]]) -> dict:
    """Hierarchical clustering of the groups' mean-routing vectors (scipy).

    Returns ``groups`` (input order), ``order`` (indices into ``groups``, the dendrogram's leaf
    order, top to bottom in the plot), ``linkage`` (scipy's [G-1, 4] matrix: the two clusters
    merged, their distance, the new cluster's size; empty for a single group), ``method`` and
    ``metric``. Leaves are ordered optimally (adjacent leaves as similar as possible).
    """
    groups, data = _routing_matrix(mean_routing)
    if len(groups) == 1:
        return {"groups": groups, "order": [0], "linkage": [], "method": LINKAGE_METHOD,
                "metric": LINKAGE_METRIC}
    z = linkage(data, method=LINKAGE_METHOD, metric=LINKAGE_METRIC, optimal_ordering=True)
    return {"groups": groups, "order": [int(i) for i in leaves_list(z)], "linkage": z.tolist(),
            "method": LINKAGE_METHOD, "metric": LINKAGE_METRIC}


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
    groups, data = _routing_matrix(mean_routing)
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


# ---------------------------------------------------------------------------- 2. expert overlap
@torch.no_grad()
def expert_overlap(model: SIMoEModel) -> np.ndarray:
    """[M, M] parameter-weighted Jaccard index |A∩B| / |A∪B| of the experts' non-zero Δ entries.

    A is the set of Δ entries expert a switches on with its evaluation gates (one gate covers
    ``params_per_gate`` entries). Jaccard rather than |A∩B| / min(|A|, |B|): it is 1 only for
    identical masks, so a small expert nested in a large one does not read as a full overlap.
    Two empty masks count as identical (1), so the diagonal is always 1.
    """
    num_experts = model.simoe_config.num_experts
    both = torch.zeros(num_experts, num_experts, dtype=torch.float64)  # exact up to 2^53 entries
    for _, layer in model.routed_layers():
        on = layer.gates_on().cpu().double()
        both += (on * layer.params_per_gate) @ on.T
    size = both.diagonal()
    either = size[:, None] + size[None, :] - both
    overlap = torch.where(either > 0, both / either.clamp_min(1), torch.ones_like(both))
    return overlap.numpy()


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


# ---------------------------------------------------------------------------- 3. non-zero share
# Module type of an upcycled Linear/Conv1D by its name ("parent.child" first, then "child"), over
# the Llama family (Mistral, Qwen, Gemma), Phi-3, GPT-2, GPT-NeoX/Falcon and OPT/Phi-2 names.
# Fused projections keep a label of their own ("qkv", "gate_up"). Norms are told by type.
_MODULE_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "qkv_proj": "qkv", "gate_up_proj": "gate_up",  # Phi-3
    "c_attn": "qkv", "attn.c_proj": "o", "c_fc": "up", "mlp.c_proj": "down",  # GPT-2
    "query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "up", "dense_4h_to_h": "down",  # GPT-NeoX
    "fc1": "up", "fc2": "down",  # OPT, Phi-2
}
TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "norm")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_type(name: str, layer: torch.nn.Module) -> str:
    """q, k, v, qkv, o, gate, up, gate_up, down or norm; an unknown module keeps its own name."""
    if isinstance(layer, SIMoENorm):
        return "norm"
    parts = name.split(".")
    return _MODULE_TYPES.get(".".join(parts[-2:]), _MODULE_TYPES.get(parts[-1], parts[-1]))


def layer_depth(name: str) -> str:
    """The decoder layer index in a module name ("model.layers.12.mlp.up_proj" -> "12"): the first
    all-digit component; modules outside the decoder layers (the final norm) are "other"."""
    match = _LAYER_INDEX.search(name)
    return match.group(1) if match else OTHER_DEPTH


@torch.no_grad()
def nonzero_share(model: SIMoEModel) -> dict:
    """Share of the upcycled Δ entries that the evaluation gates keep, by depth and by type.

    For each bucket: ``upcycled_params`` (entries of the upcycled weights), ``nonzero_params``
    (entries on in any expert: the union, what inference keeps), ``share`` (their ratio) and
    ``experts`` (each expert's own share). ``by_depth`` keys are layer indices ("0", "1", ...) then
    "other"; ``by_type`` follows TYPE_ORDER, unknown types last. ``overall`` equals the union's
    deterministic density in :meth:`SIMoEModel.sparsity_report`.
    """
    num_experts = model.simoe_config.num_experts
    counts: dict[str, dict[str, list]] = {"by_depth": {}, "by_type": {}, "overall": {}}
    for name, layer in model.routed_layers():
        on = layer.gates_on().cpu()
        w = layer.params_per_gate
        union, per_expert = int(on.any(dim=0).sum()) * w, [int(n) * w for n in on.sum(dim=1)]
        for kind, key in (("by_depth", layer_depth(name)), ("by_type", module_type(name, layer)),
                          ("overall", "all")):
            c = counts[kind].setdefault(key, [0, 0, [0] * num_experts])
            c[0] += layer.base.weight.numel()
            c[1] += union
            c[2] = [a + b for a, b in zip(c[2], per_expert, strict=True)]
    if not counts["overall"]:
        raise ValueError("the model has no upcycled modules")

    def entry(total: int, union: int, per_expert: list[int]) -> dict:
        return {"upcycled_params": total, "nonzero_params": union, "share": union / total,
                "experts": [n / total for n in per_expert]}

    def depth_key(key: str) -> tuple:
        return (1, 0) if key == OTHER_DEPTH else (0, int(key))

    def type_key(key: str) -> int:
        return TYPE_ORDER.index(key) if key in TYPE_ORDER else len(TYPE_ORDER)

    return {
        "num_experts": num_experts,
        "target_density": model.simoe_config.target_density,
        "by_depth": {k: entry(*counts["by_depth"][k]) for k in sorted(counts["by_depth"], key=depth_key)},
        "by_type": {k: entry(*counts["by_type"][k]) for k in sorted(counts["by_type"], key=type_key)},
        "overall": entry(*counts["overall"]["all"]),
    }


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


# ---------------------------------------------------------------------------- all of them
def analyze(
    model: SIMoEModel, tokenizer, records: Sequence[dict], output_dir: str | os.PathLike,
    batch_size: int = 32,
) -> dict:
    """Run the three analyses, writing ``routing_heatmap``, ``expert_overlap`` and ``nonzero_share``
    (.png and .json each) into ``output_dir``.

    Returns a summary: the three JSON payloads under ``routing``, ``overlap`` and ``nonzero_share``,
    the file paths under ``files``, and headline numbers under ``summary`` (groups, experts, mean
    off-diagonal overlap, overall non-zero share).
    """
    out = Path(output_dir)
    routing = plot_routing_heatmap(mean_routing_by_group(model, tokenizer, records, batch_size),
                                   out / "routing_heatmap.png")
    overlap_matrix = expert_overlap(model)
    overlap = plot_expert_overlap(overlap_matrix, out / "expert_overlap.png")
    share = plot_nonzero_share(nonzero_share(model), out / "nonzero_share.png")
    n = overlap_matrix.shape[0]
    off_diagonal = overlap_matrix[~np.eye(n, dtype=bool)]
    files = [str(out / f"{stem}{ext}") for stem in ("routing_heatmap", "expert_overlap", "nonzero_share")
             for ext in (".png", ".json")]
    return {
        "summary": {
            "groups": len(routing["groups"]),
            "num_experts": n,
            "mean_overlap": float(off_diagonal.mean()) if n > 1 else None,
            "nonzero_share": share["overall"]["share"],
        },
        "routing": routing, "overlap": overlap, "nonzero_share": share, "files": files,
    }
