"""Compact and merged exports: what they keep, what they drop, and that they compute the same logits."""

import json

import pytest
import torch
from conftest import VOCAB, char_tokenizer, randomize_experts, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from simoe import SIMoEConfig, hard_concrete, upcycle
from simoe.config import CONFIG_NAME
from simoe.inference.export import (
    COMPACT_WEIGHTS_NAME,
    MERGE_INFO_NAME,
    REPORT_NAME,
    load_compact,
    save_compact,
    save_merged,
)
from simoe.inference.routing import mean_routing, parse_routing

M = 3
ARCHS = ["llama", "gpt2", "gemma3", "qwen2", "gemma2"]


def _base(arch):
    """A tiny base whose norm weights are random too, so a wrong norm merge cannot hide at w0 = 0/1."""
    base = tiny_model(arch)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in base.named_parameters():
            is_norm = "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            if p.dim() == 1 and is_norm:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base


def _trained(arch):
    model = upcycle(_base(arch), SIMoEConfig(num_experts=M))
    randomize_experts(model)
    model.set_router_temperature(0.7)
    return model.eval()


def _ids(batch=2, seq=9, seed=3):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _gates(log_alpha):
    """Noise-free (default regime) evaluation gates, written out here rather than taken from the library."""
    return (torch.sigmoid(log_alpha / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)


# ---------------------------------------------------------------- compact
@pytest.mark.parametrize("arch", ARCHS)
def test_compact_reload_gives_identical_logits(tmp_path, arch):
    model = _trained(arch)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_compact(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME, COMPACT_WEIGHTS_NAME, CONFIG_NAME]
    reloaded = load_compact(_base(arch), tmp_path)
    assert not reloaded.training
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert torch.equal(before, after)
    # the gates themselves come back bit for bit, so every deterministic statistic does too
    for (name, a), (_, b) in zip(model.routed_layers(), reloaded.routed_layers(), strict=True):
        assert torch.equal(_gates(a.log_alpha), _gates(b.log_alpha)), name
    union = [m.sparsity_report()["union"]["nonzero_params"] for m in (model, reloaded)]
    assert union[0] == union[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compact_keeps_exactly_the_columns_some_expert_uses(tmp_path, arch):
    model = _trained(arch)
    report = save_compact(model, tmp_path)
    saved = load_file(tmp_path / COMPACT_WEIGHTS_NAME)
    assert not any(".base." in k or k.endswith("log_alpha") for k in saved)  # no base weight, no logits

    nonzero_delta, kept_total, dropped_total = 0, 0, 0
    for name, layer in model.routed_layers():
        z = _gates(layer.log_alpha.detach())
        kept = [c for c in range(z.shape[1]) if any(z[e, c] > 0 for e in range(M))]
        dropped_total += z.shape[1] - len(kept)
        kept_total += len(kept)
        assert saved[f"{name}.columns"].tolist() == kept, name
        delta = layer.delta.detach()
        if isinstance(layer.base, Conv1D):
            expected = delta[kept, :]
            nonzero_delta += len(kept) * delta.shape[1]
        elif delta.dim() == 2:
            expected = delta[:, kept]
            nonzero_delta += len(kept) * delta.shape[0]
        else:
            expected = delta[kept]
            nonzero_delta += len(kept)
        assert torch.equal(saved[f"{name}.delta"], expected), name
        assert torch.equal(saved[f"{name}.gates"], z[:, kept]), name
    assert dropped_total > 0 and kept_total > 0
    assert {k.removeprefix("router.") for k in saved if k.startswith("router.")} == set(
        model.router.state_dict())

    # the report against counts made from a fresh base, not from the library
    base = tiny_model(arch)
    base_params = sum(p.numel() for p in base.parameters())
    ffn = sum(p.numel() for n, p in base.named_parameters() if ".mlp." in n)
    router = sum(p.numel() for p in model.router.parameters())
    assert report["base_params"] == base_params
    assert report["nonzero_delta_params"] == nonzero_delta
    assert nonzero_delta == model.sparsity_report()["union"]["nonzero_params"]
    assert report["gate_params"] == M * kept_total
    assert report["router_params"] == router
    total = base_params + nonzero_delta + M * kept_total + router
    assert report["total_inference_params"] == total
    assert report["moe_top2"]["active_params"] == base_params + ffn
    assert report["moe_top2"]["total_params"] == base_params + 3 * ffn
    assert report["ratio_to_moe_top2_active"] == pytest.approx(total / (base_params + ffn))
    assert json.loads((tmp_path / REPORT_NAME).read_text()) == report


def test_compact_export_leaves_the_model_unchanged(tmp_path):
    model = _trained("qwen2")
    state = _snapshot(model)
    save_compact(model, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())


def test_compact_loader_rejects_a_tampered_file(tmp_path):
    from safetensors.torch import save_file

    save_compact(_trained("llama"), tmp_path)
    path = tmp_path / COMPACT_WEIGHTS_NAME
    good = load_file(path)
    key = next(k for k in good if k.endswith("q_proj.columns"))
    layer = key.removesuffix(".columns")

    def check(tensors, message):
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with pytest.raises(ValueError, match=message):
            load_compact(tiny_model("llama"), tmp_path)

    check({k: v for k, v in good.items() if k != key}, r"does not fit this model: missing \['.*q_proj.col")
    check({**good, key: good[key].flip(0)}, f"{key}: column indices must be strictly increasing")
    check({**good, key: good[key] + 1000}, rf"{key}: column index outside \[0, 32\)")
    gates, delta = good[f"{layer}.gates"], good[f"{layer}.delta"]
    check({**good, f"{layer}.gates": gates[:, 1:]}, f"{layer}.gates has shape")
    check({**good, f"{layer}.gates": gates * 2}, rf"{layer}.gates has values outside \[0, 1\]")
    check({**good, f"{layer}.delta": delta.T}, f"{layer}.delta has shape")


@pytest.mark.parametrize("regime", hard_concrete.REGIMES)
def test_gate_inversion_is_exact_at_the_clamps_and_in_between(regime):
    from simoe.inference.export import _log_alpha_for

    g = torch.Generator().manual_seed(0)
    log_alpha = 20 * torch.rand(M, 4096, generator=g) - 10
    log_alpha[0, :4] = torch.tensor([0.0, -2.3978953, 2.3978953, -1e-30])  # near gate 0, 1 and 0.5
    log_alpha[1, :2] = torch.tensor([-1.5985, 1.5985])  # the noise-free gate's 0 and 1
    gates = hard_concrete.gates(log_alpha, regime, training=False)
    assert (gates == 0).any() and (gates == 1).any()
    assert torch.equal(hard_concrete.gates(_log_alpha_for(gates, regime), regime, training=False), gates)


# ---------------------------------------------------------------- merged
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_loads_without_simoe_and_matches_fixed_routing(tmp_path, arch):
    model = _trained(arch)
    ids = _ids()
    state = _snapshot(model)
    with torch.no_grad():
        base_logits = _base(arch)(input_ids=ids).logits
    merged_logits = {}
    for spec in ("expert:1", "weights:0.2,0.5,0.3"):
        routing = parse_routing(spec, M)
        out = tmp_path / spec.split(":")[0]
        save_merged(model, routing, out)
        plain, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert json.loads((out / MERGE_INFO_NAME).read_text())["routing"] == pytest.approx(routing.tolist())
        with torch.no_grad():
            expected = model(input_ids=ids, routing=routing.expand(len(ids), M)).logits
            got = plain.eval()(input_ids=ids).logits
        assert (got - expected).abs().max() <= 1e-4, spec
        assert (got - base_logits).abs().max() > 1e-2  # the experts do change the model
        merged_logits[spec] = got
    assert (merged_logits["expert:1"] - merged_logits["weights:0.2,0.5,0.3"]).abs().max() > 1e-2
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())  # the caller's model is untouched
    assert not model.training


def test_merged_keeps_dtype_and_writes_the_tokenizer(tmp_path):
    model = upcycle(tiny_model("llama").to(torch.bfloat16), SIMoEConfig(num_experts=M))
    randomize_experts(model)
    tokenizer = char_tokenizer()
    save_merged(model, parse_routing("expert:0", M), tmp_path, tokenizer=tokenizer)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(tiny_model("llama").state_dict())
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(tmp_path)("w5 w7").input_ids == tokenizer("w5 w7").input_ids


def test_parse_routing():
    assert parse_routing("expert:2", M).tolist() == [0.0, 0.0, 1.0]
    assert parse_routing("weights:1,1,0", M).tolist() == [0.5, 0.5, 0.0]  # normalised
    assert parse_routing("weights:0.2,0.5,0.3", M).sum().item() == pytest.approx(1.0)
    bad = {
        "expert:3": r"expert K=3 outside \[0, 3\)",
        "expert:-1": r"expert K=-1 outside \[0, 3\)",
        "expert:one": "K='one' is not an integer",
        "weights:1,2": "2 weights given, the model has 3 experts",
        "weights:1,-0.5,1": r"weight 1 \('-0.5'\) must be finite and >= 0",
        "weights:1,nan,1": r"weight 1 \('nan'\) must be finite",
        "weights:1,x,1": r"weight 1 \('x'\) is not a number",
        "weights:0,0,0": "the weights are all 0",
        "expert": "expected expert:K, weights:w1,...,wM or dataset:FILE",
        "mean:1": "expected expert:K",
        "dataset:/no/such/file.jsonl": "dataset file '/no/such/file.jsonl' does not exist",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_routing(spec, M)


def test_parse_routing_dataset_returns_the_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("{}\n")
    assert parse_routing(f"dataset:{path}", M) == path


def test_mean_routing_is_the_mean_over_prompts_not_batches():
    model = _trained("llama")
    model.train()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 8, 3, 6)]
    answers = [torch.randint(3, VOCAB, (n,), generator=g) for n in (2, 4, 3, 1)]

    def batch(indices):  # right-padded prompt + answer, prompt_mask marking the prompt
        rows = [torch.cat([prompts[i], answers[i]]) for i in indices]
        width = max(len(r) for r in rows)
        ids, am, pm = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
        for j, (i, row) in enumerate(zip(indices, rows, strict=True)):
            ids[j, : len(row)], am[j, : len(row)], pm[j, : len(prompts[i])] = row, 1, 1
        return {"input_ids": ids, "attention_mask": am, "prompt_mask": pm}

    got = mean_routing(model, [batch([0, 1, 2]), batch([3])])
    assert model.training  # restored
    with torch.no_grad():
        singles = torch.cat([model.eval().route(p[None]) for p in prompts])
    assert torch.allclose(got, singles.mean(dim=0), atol=1e-6)
    assert got.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch 0: no input_ids"):
        mean_routing(model, [{"ids": prompts[0][None]}])
