"""All analyses of one checkpoint on one dataset (``simoe analyze``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simoe.analysis.compute import expert_overlap, mean_routing_by_group, nonzero_share
from simoe.analysis.plots import plot_expert_overlap, plot_nonzero_share, plot_routing_heatmap
from simoe.model import SIMoEModel


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

