"""The numbers behind the paper's analyses of a trained SIMoE model.

1. How the router spreads task groups over the experts: mean routing per group, its hierarchical
   clustering, and how specialised it is (expert load, NMI between group and top expert).
2. How much the experts' masks overlap: parameter-weighted Jaccard index of the evaluation gates.
3. Where upcycling keeps parameters: the share of non-zero Δ entries by layer depth and module type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage

from simoe.data import pad_id_of, render_prompt
from simoe.evaluation.families import split_record
from simoe.inference.generation import eval_mode, pad_left
from simoe.layer import SIMoENorm
from simoe.model import SIMoEModel

# Average linkage (UPGMA) on Euclidean distance: routing rows all lie on the simplex, so plain
# distance compares them directly; identical rows are at distance 0 and merge first.
LINKAGE_METHOD, LINKAGE_METRIC = "average", "euclidean"


OVERLAP_METRIC = "parameter-weighted Jaccard |A∩B| / |A∪B|"


OTHER_DEPTH = "other"  # bucket of upcycled modules outside the decoder layers (e.g. the final norm)


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


def routing_matrix(mean_routing: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
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
    groups, data = routing_matrix(mean_routing)
    if len(groups) == 1:
        return {"groups": groups, "order": [0], "linkage": [], "method": LINKAGE_METHOD,
                "metric": LINKAGE_METRIC}
    z = linkage(data, method=LINKAGE_METHOD, metric=LINKAGE_METRIC, optimal_ordering=True)
    return {"groups": groups, "order": [int(i) for i in leaves_list(z)], "linkage": z.tolist(),
            "method": LINKAGE_METHOD, "metric": LINKAGE_METRIC}


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
            c[0] += layer.weight_shape.numel()
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

