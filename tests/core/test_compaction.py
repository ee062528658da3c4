"""Compaction (SIMoEModel.compact_): dropping the columns every expert gates off changes nothing the
model computes, and a compacted model saves, loads, exports and expands to the same model."""

import pytest
import torch
from conftest import tiny_model, tiny_simoe, train_without_dropout
from safetensors.torch import load_file

from simoe import SIMoEConfig, SIMoEModel, upcycle
from simoe.inference.export import COMPACT_WEIGHTS_NAME, save_compact
from simoe.layer import SIMoELinear

IDS = torch.tensor([[5, 9, 3, 7, 11, 4], [8, 2, 6, 12, 10, 3]])


def _dropped(model) -> dict[str, torch.Tensor]:
    """Per linear layer, the input columns every expert gates off."""
    return {name: ~layer.gates_on().any(dim=0) for name, layer in model.routed_layers()
            if isinstance(layer, SIMoELinear)}


def _logits_and_grads(model):
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {name: layer.delta.grad.clone() for name, layer in model.routed_layers()}
    router = [p.grad.clone() for p in model.router.parameters()]
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads, router


@pytest.mark.parametrize("keep_an_off_column", [False, True])
def test_compaction_changes_nothing_the_model_computes(arch, keep_an_off_column):
    """Compacted to the columns some expert keeps, or (as after a column dies once compacted) to
    those and one that every expert gates off."""
    model = tiny_simoe(arch)
    train_without_dropout(model)
    dropped = _dropped(model)
    assert all(d.any() for d in dropped.values())  # randomize_experts switches a quarter off
    logits, grads, router = _logits_and_grads(model)
    full_state = {k: v.detach().clone() for k, v in model.routed_state_dict().items()}

    kept = None
    if keep_an_off_column:
        for d in dropped.values():
            d[d.nonzero()[0]] = False
        kept = {name: (~d).nonzero().squeeze(1) for name, d in dropped.items()}
    local = model.compact_(kept)
    for name, layer in model.routed_layers():
        if name not in dropped:
            continue
        kept = (~dropped[name]).nonzero().squeeze(1)
        assert torch.equal(layer.kept, kept) and torch.equal(local[name], kept), name
        width = layer.delta.shape[layer.column_dim]
        assert width == layer.log_alpha.shape[1] == kept.numel() < layer.in_features
    c_logits, c_grads, c_router = _logits_and_grads(model)
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(c_router, router, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for name, layer in model.routed_layers():
        full = grads[name]
        if name in dropped:
            full = full.index_select(layer.column_dim, layer.kept)
        torch.testing.assert_close(c_grads[name], full, rtol=1e-4, atol=1e-6, msg=name)

    # saved at the full width: Δ = 0 and log α at its floor (a gate of 0) where columns were dropped
    state = model.routed_state_dict()
    for key, value in state.items():
        expected = full_state[key]
        name, _, kind = key.rpartition(".")
        if name in dropped and kind in ("delta", "log_alpha"):
            layer = dict(model.routed_layers())[name]
            dim = layer.column_dim if kind == "delta" else 1
            fill = 0.0 if kind == "delta" else model.simoe_config.mask_logit_min
            expected = expected.clone().index_fill_(dim, dropped[name].nonzero().squeeze(1), fill)
        assert torch.equal(value.detach(), expected), key

    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=IDS).logits
        model.expand_()
        assert not model.compacted_columns()
        torch.testing.assert_close(model(input_ids=IDS).logits, eval_logits, rtol=1e-5, atol=1e-6)


def test_a_compacted_model_saves_loads_generates_and_exports_as_its_expanded_self(tmp_path):
    model = tiny_simoe("llama")
    model.compact_()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        one = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)  # folded: one routing
        two = model.generate(IDS, max_new_tokens=4, do_sample=False)  # per-prompt routings
    model.save_pretrained(tmp_path / "saved")
    save_compact(model, tmp_path / "compact")
    with pytest.raises(RuntimeError, match="expand_"):
        model.load_routed_weights(tmp_path / "saved")

    loaded = SIMoEModel.from_pretrained(tiny_model("llama"), tmp_path / "saved").eval()
    assert not loaded.compacted_columns()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(loaded.generate(IDS[:1], max_new_tokens=4, do_sample=False), one)
        assert torch.equal(loaded.generate(IDS, max_new_tokens=4, do_sample=False), two)
    save_compact(loaded, tmp_path / "compact_of_loaded")
    a = load_file(tmp_path / "compact" / COMPACT_WEIGHTS_NAME)
    b = load_file(tmp_path / "compact_of_loaded" / COMPACT_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for key in a:  # gates to an ulp: sigmoid's vectorised loop rounds a row's tail its own way
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0, msg=key)


def test_compaction_refuses_what_it_cannot_do_exactly():
    stochastic = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2, gate_regime="stochastic"))
    with pytest.raises(ValueError, match="noise-free"):
        stochastic.compact_()
    model = tiny_simoe("llama")
    kept = {name: torch.arange(4) for name, layer in model.routed_layers() if isinstance(layer, SIMoELinear)}
    model.compact_(kept)
    assert all(v.tolist() == [0, 1, 2, 3] for v in model.compacted_columns().values())
    with pytest.raises(ValueError, match="compacted already"):
        model.compact_(kept)


def test_layer_bookkeeping_does_not_read_the_live_base_weight():
    """DeepSpeed ZeRO-3 empties a partitioned weight's data and keeps its shape as ``ds_shape``: the
    layers' sizes, Δ's shape and every density report come from the shape kept at construction."""
    from simoe import objectives
    from simoe.parameters import parameter_report

    model = tiny_simoe("llama")
    before = (model.sparsity_report(), parameter_report(model))
    layers = [layer for _, layer in model.routed_layers()]
    orth = objectives.orthogonality(layers)
    for weight in [p for p in model.base_model.parameters() if not p.requires_grad]:  # partitioned
        weight.ds_shape, weight.ds_numel = weight.shape, weight.numel()
        weight.data = torch.empty(0, dtype=weight.dtype)
    assert (model.sparsity_report(), parameter_report(model)) == before
    assert torch.equal(objectives.orthogonality(layers), orth)
    partitioned = layers[0].base
    rebuilt = SIMoELinear(partitioned, 4, 0.0, 0.1)
    assert rebuilt.delta.shape == partitioned.weight.ds_shape and rebuilt.in_features == layers[0].in_features
