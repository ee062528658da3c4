import json

import numpy as np
import pytest
import torch
from conftest import PROMPTS, chat_records, tiny_simoe
from matplotlib.image import imread
from transformers.pytorch_utils import Conv1D

from simoe.analysis.compute import (
    cluster_groups,
    expert_overlap,
    layer_depth,
    mean_routing_by_group,
    module_type,
    nonzero_share,
)
from simoe.analysis.plots import plot_routing_heatmap
from simoe.analysis.report import analyze
from simoe.data import render_prompt
from simoe.layer import SIMoENorm


def _masks(model):
    """{(module, Δ entry index): bool [M]}: brute force, one Δ entry at a time, from the gates."""
    masks = {}
    for name, layer in model.routed_layers():
        on = (layer.eval_gates() > 0).T.tolist()  # [in][M]
        for index in np.ndindex(*layer.delta.shape):
            # the gate of a Linear's entry (out, in) is its column; a Conv1D's (in, out) its row
            column = index[0] if isinstance(layer.base, Conv1D) or isinstance(layer, SIMoENorm) else index[1]
            masks[(name, index)] = on[column]
    return masks


# ---------------------------------------------------------------------------- routing by group
@pytest.mark.parametrize("router_input", ["embedding-mean", "hidden-mean"])
def test_mean_routing_by_group_equals_manual_routing(tokenizer, router_input):
    model = tiny_simoe(router_input=router_input)
    groups = ["a", "b", "a", "b", "a"]
    records = chat_records(PROMPTS, groups)
    got = mean_routing_by_group(model, tokenizer, records, batch_size=2)
    with torch.no_grad():
        rows = [model.route(torch.tensor([render_prompt(tokenizer, r["messages"][:-1])]))[0]
                for r in records]
    expected = {g: torch.stack([row for row, gg in zip(rows, groups, strict=True) if gg == g]).mean(0)
                for g in ("a", "b")}
    assert list(got) == ["a", "b"]
    for g, row in expected.items():
        assert torch.allclose(torch.tensor(got[g], dtype=torch.float32), row, atol=1e-5)
        assert sum(got[g]) == pytest.approx(1.0)
    assert not torch.allclose(expected["a"], expected["b"])
    with pytest.raises(ValueError, match="record 1: field 'group'"):
        mean_routing_by_group(model, tokenizer, [records[0], {**records[1], "group": None}])


def test_identical_groups_end_adjacent_in_the_dendrogram_order():
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.ones(5), size=4)
    # a and d route identically, as do b and f; they are placed apart in the input
    routing = {"a": rows[0], "b": rows[1], "c": rows[2], "d": rows[0], "e": rows[3], "f": rows[1]}
    clusters = cluster_groups({g: r.tolist() for g, r in routing.items()})
    order = clusters["order"]
    assert sorted(order) == list(range(6))
    shown = [clusters["groups"][i] for i in order]
    assert abs(shown.index("a") - shown.index("d")) == 1
    assert abs(shown.index("b") - shown.index("f")) == 1
    z = np.array(clusters["linkage"])
    assert z.shape == (5, 4) and sorted(z[:2, 2]) == [0.0, 0.0]  # the identical pairs merge first, at 0
    assert not np.any(z[2:, 2] == 0)
    assert (clusters["method"], clusters["metric"]) == ("average", "euclidean")
    assert cluster_groups({"only": [0.5, 0.5]})["order"] == [0]


def test_heatmap_png_and_json(tmp_path):
    routing = {"add": [0.5, 0.25, 0.125, 0.125], "reverse the word": [0.0, 0.1, 0.2, 0.7],
               "sort": [0.45, 0.3, 0.125, 0.125]}
    png = tmp_path / "plots" / "routing.png"
    payload = plot_routing_heatmap(routing, png, title="test")
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert json.loads(png.with_suffix(".json").read_text()) == payload
    assert payload["mean_routing"] == routing and payload["groups"] == list(routing)
    assert payload["order"] in ([0, 2, 1], [2, 0, 1], [1, 0, 2], [1, 2, 0])  # add and sort are closest
    with pytest.raises(ValueError, match="same"):
        plot_routing_heatmap({"a": [1.0], "b": [0.5, 0.5]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plot_routing_heatmap({}, tmp_path / "bad.png")


# ---------------------------------------------------------------------------- expert overlap
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_expert_overlap_equals_brute_force_jaccard(arch):
    model = tiny_simoe(arch, num_experts=4)
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.log_alpha[3] = layer.log_alpha[1]  # expert 3 is a copy of expert 1
    masks = _masks(model)
    got = expert_overlap(model)
    assert got.shape == (4, 4)
    for a in range(4):
        for b in range(4):
            both = sum(bool(m[a] and m[b]) for m in masks.values())
            either = sum(bool(m[a] or m[b]) for m in masks.values())
            assert got[a, b] == pytest.approx(both / either, rel=1e-12)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(np.diag(got), np.ones(4))
    assert got[1, 3] == 1.0
    assert 0 < got[0, 1] < 1 and 0 < got[0, 2] < 1


def test_expert_overlap_of_an_empty_expert():
    model = tiny_simoe(num_experts=3)
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.log_alpha[2] = -10.0  # expert 2 switches nothing on
    got = expert_overlap(model)
    assert got[2].tolist() == [0.0, 0.0, 1.0] and got[:, 2].tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------- non-zero share
EXPECTED_TYPES = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down", "norm"],
    "qwen3": ["q", "k", "v", "o", "gate", "up", "down", "norm"],
    "gpt2": ["qkv", "o", "up", "down", "norm"],
    "gpt_neox": ["qkv", "o", "up", "down", "norm"],
    "phi3": ["qkv", "o", "gate_up", "down", "norm"],
}
# module name (last one or two components) -> type, written out per architecture
NAME_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
    "down_proj": "down", "qkv_proj": "qkv", "gate_up_proj": "gate_up", "input_layernorm": "norm",
    "post_attention_layernorm": "norm", "q_norm": "norm", "k_norm": "norm", "norm": "norm",
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down", "ln_1": "norm",
    "ln_2": "norm", "ln_f": "norm", "query_key_value": "qkv", "attention.dense": "o",
    "dense_h_to_4h": "up", "dense_4h_to_h": "down", "final_layer_norm": "norm",
}


def _type_by_name(name):
    parts = name.split(".")
    return NAME_TYPES.get(".".join(parts[-2:])) or NAME_TYPES[parts[-1]]


@pytest.mark.parametrize("arch", sorted(EXPECTED_TYPES))
def test_nonzero_share_equals_an_independent_count(arch):
    model = tiny_simoe(arch, num_experts=3)
    share = nonzero_share(model)
    assert list(share["by_type"]) == EXPECTED_TYPES[arch]
    assert list(share["by_depth"]) == ["0", "1", "other"]  # two decoder layers, then the final norm
    # count the non-zero entries of Δ ⊙ mask (Δ is random, so non-zero wherever the mask is on)
    counts = {}
    for name, layer in model.routed_layers():
        on = (layer.eval_gates() > 0).float()
        delta = layer.delta.detach()
        if isinstance(layer.base, Conv1D) or isinstance(layer, SIMoENorm):
            gated = [delta * (on[m] if delta.dim() == 1 else on[m][:, None]) for m in range(3)]
        else:
            gated = [delta * on[m] for m in range(3)]
        union = int(torch.count_nonzero(torch.stack(gated).abs().sum(0)))
        experts = [int(torch.count_nonzero(g)) for g in gated]
        depth = name.split(".")[2] if ".layers." in name or ".h." in name else "other"
        for key in (("by_depth", depth), ("by_type", _type_by_name(name)), ("overall", None)):
            c = counts.setdefault(key, [0, 0, [0, 0, 0]])
            c[0] += delta.numel()
            c[1] += union
            c[2] = [a + b for a, b in zip(c[2], experts, strict=True)]
    for (kind, key), (total, union, experts) in counts.items():
        got = share[kind] if key is None else share[kind][key]
        assert (got["upcycled_params"], got["nonzero_params"]) == (total, union), (kind, key)
        assert got["share"] == union / total
        assert got["experts"] == [n / total for n in experts]
        assert 0 < got["share"] < 1
    report = model.sparsity_report()
    assert share["overall"]["share"] == report["union"]["deterministic_density"]
    assert share["overall"]["experts"] == [e["deterministic_density"] for e in report["experts"]]


def test_module_names():
    assert layer_depth("model.layers.12.self_attn.q_proj") == "12"
    assert layer_depth("transformer.h.3.mlp.c_fc") == "3"
    assert layer_depth("model.norm") == "other"
    linear = torch.nn.Linear(2, 2)
    assert module_type("transformer.h.0.attn.c_proj", linear) == "o"
    assert module_type("transformer.h.0.mlp.c_proj", linear) == "down"
    assert module_type("gpt_neox.layers.0.attention.dense", linear) == "o"
    assert module_type("model.layers.0.mlp.gate_up_proj", linear) == "gate_up"
    assert module_type("model.layers.0.mlp.experts_in", linear) == "experts_in"  # unknown: its own name


# ---------------------------------------------------------------------------- all of them
def test_analyze_writes_pngs_and_jsons_equal_to_the_returned_numbers(tmp_path, tokenizer):
    model = tiny_simoe(num_experts=3)
    # "b2" holds the same prompt as "b" (in another batch, other padding): they route alike
    records = chat_records([*PROMPTS, PROMPTS[1]], ["a", "b", "a", "c", "c", "b2"])
    result = analyze(model, tokenizer, records, tmp_path / "out", batch_size=3)
    for stem, key in (("routing_heatmap", "routing"), ("expert_overlap", "overlap"),
                      ("nonzero_share", "nonzero_share")):
        image = imread(tmp_path / "out" / f"{stem}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert json.loads((tmp_path / "out" / f"{stem}.json").read_text()) == result[key]
        assert str(tmp_path / "out" / f"{stem}.png") in result["files"]
    assert result["overlap"]["overlap"] == expert_overlap(model).tolist()
    assert result["nonzero_share"] == nonzero_share(model)
    assert result["routing"]["mean_routing"] == mean_routing_by_group(model, tokenizer, records, batch_size=3)
    shown = [result["routing"]["groups"][i] for i in result["routing"]["order"]]
    assert sorted(shown) == ["a", "b", "b2", "c"]
    assert abs(shown.index("b") - shown.index("b2")) == 1
    summary = result["summary"]
    assert summary["groups"] == 4 and summary["num_experts"] == 3
    assert summary["nonzero_share"] == model.sparsity_report()["union"]["deterministic_density"]
    overlap = np.array(result["overlap"]["overlap"])
    assert summary["mean_overlap"] == pytest.approx((overlap.sum() - 3) / 6)


def test_analyze_command_writes_the_three_analyses(tmp_path):
    from conftest import save_tiny_checkpoint

    from simoe.cli import main
    from simoe.data import load_records
    from simoe.inference.loading import load_for_inference

    _, ckpt = save_tiny_checkpoint(tmp_path)
    rows = [{"instruction": f"{verb} {i}", "output": "ok", "task": verb} for verb in ("add", "sort", "echo")
            for i in range(4)]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "analysis"
    main(["analyze", "--checkpoint", ckpt, "--data", str(data), "--output_dir", str(out)])
    for name in ("routing_heatmap", "expert_overlap", "nonzero_share"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.json").is_file()
    model, tokenizer = load_for_inference(ckpt)
    expected = mean_routing_by_group(model, tokenizer, load_records(str(data)))
    written = json.loads((out / "routing_heatmap.json").read_text())["mean_routing"]
    assert written.keys() == expected.keys() == {"add", "sort", "echo"}
    for group, row in expected.items():
        assert written[group] == pytest.approx(row, abs=1e-6)


def test_routing_specialisation_load_and_nmi():
    from simoe.analysis.compute import routing_specialisation

    groups = ["a", "a", "b", "b"]
    separated = routing_specialisation(groups, torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]]))
    assert separated["nmi"] == pytest.approx(1.0)
    assert separated["load"] == pytest.approx([0.525, 0.475])
    mixed = routing_specialisation(groups, torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8]]))
    assert mixed["nmi"] == pytest.approx(0.0, abs=1e-12) and mixed["top_expert_share"] == [0.5, 0.5]
    # 3 groups on 2 experts: a and b share expert 0, c has expert 1. I = H(top) = ln 2 - ...
    three = routing_specialisation(["a", "b", "c"], torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]]))
    h_group, h_top = np.log(3), -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert three["nmi"] == pytest.approx(h_top / ((h_group + h_top) / 2))
