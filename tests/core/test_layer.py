"""The efficient forward W0 x + Δ(m ⊙ x) equals materialising W0 + Δ·diag(m_b) per example."""

import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model
from torch import nn
from torch.func import functional_call
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from simoe import SIMoEConfig, SIMoELinear, SIMoENorm, upcycle
from simoe.masked_delta import MaskedDelta

M, B, T = 5, 4, 7


def _routing(batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(batch, M, generator=g), dim=-1)


def _randomize(layer, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(layer.delta.shape, generator=g))
        layer.log_alpha.copy_(6 * torch.rand(layer.log_alpha.shape, generator=g) - 3)
        if isinstance(layer.base, (nn.LayerNorm, Gemma3RMSNorm, LlamaRMSNorm)):
            layer.base.weight.copy_(torch.randn(layer.base.weight.shape, generator=g))


def _merged_weight(layer, mix_b):
    """W0 + Δ·diag(m_b): gates scale Δ's input columns (rows of a Conv1D weight)."""
    w0, delta = layer.base.weight, layer.delta
    if isinstance(layer.base, Conv1D):
        return w0 + mix_b[:, None] * delta
    if w0.dim() == 2:
        return w0 + delta * mix_b[None, :]
    return w0 + mix_b * delta


def _check_layer(layer, x, train):
    _randomize(layer)
    layer.train(train)
    r = _routing()
    torch.manual_seed(3)
    z = layer.gates()
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    layer.set_routing(r, z)
    y = layer(x)
    for b in range(B):
        w = _merged_weight(layer, layer.merged_gates[b])
        ref = functional_call(layer.base, {"weight": w}, (x[b : b + 1],))
        assert (y[b : b + 1] - ref).abs().max() <= 1e-5


def test_linear_with_bias():
    for train in (False, True):
        _check_layer(SIMoELinear(nn.Linear(12, 9), M, 3.0, 0.1), torch.randn(B, T, 12), train)


def test_gpt2_conv1d():
    _check_layer(SIMoELinear(Conv1D(9, 12), M, 3.0, 0.1), torch.randn(B, T, 12), True)


def test_norms_layernorm_rmsnorm_and_gemma_offset_rmsnorm():
    """Both paths: RMSNorms take a per-example weight in one forward, LayerNorm needs three."""
    for norm, one_forward in ((nn.LayerNorm(10), False), (LlamaRMSNorm(10), True), (Gemma3RMSNorm(10), True)):
        layer = SIMoENorm(norm, M, 3.0, 0.1)
        assert layer.per_example_weight == one_forward, type(norm).__name__
        _check_layer(layer, torch.randn(B, T, 10), True)
    # q/k norms see [batch, seq, heads, head_dim]
    _check_layer(SIMoENorm(LlamaRMSNorm(6), M, 3.0, 0.1), torch.randn(B, T, 3, 6), False)


def test_whole_model_equals_per_example_materialised_weights():
    """Batched SIMoE logits == the frozen base run one example at a time on merged weights."""
    for arch in ("llama", "gpt2", "gemma3"):
        model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=M))
        randomize_experts(model)
        model.eval()
        ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
        r = _routing()
        with torch.no_grad():
            logits = model(input_ids=ids, routing=r).logits
            layers = dict(model.routed_layers())
            for layer in layers.values():
                assert torch.allclose(layer.merged_gates, r @ layer.eval_gates())
            for b in range(B):
                weights = {
                    f"{name}.base.weight": _merged_weight(layer, layer.merged_gates[b])
                    for name, layer in layers.items()
                }
                with model.bypass():
                    ref = functional_call(model.base_model, weights, (), {"input_ids": ids[b : b + 1]})
                assert (logits[b : b + 1] - ref.logits).abs().max() <= 1e-5, arch


def test_masked_delta_gradients_equal_autograd_reference():
    """The custom backward of Δ(m ⊙ x) is exact: gradcheck in float64, both weight layouts, on all
    columns and on a compacted Δ (4 of x's 7 columns) with 3 of its columns active."""
    g = torch.Generator().manual_seed(0)
    kept, active = torch.tensor([0, 2, 3, 6]), torch.tensor([0, 1, 3])
    for x_width, columns, kept_columns, index in ((5, 5, None, None), (7, 4, kept, active)):
        x = torch.randn(3, 4, 2, x_width, dtype=torch.float64, generator=g, requires_grad=True)
        merged = torch.rand(3, 1, 1, columns, dtype=torch.float64, generator=g, requires_grad=True)
        for conv1d, shape in ((False, (6, columns)), (True, (columns, 6))):
            delta = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda x, m, d: MaskedDelta.apply(x, m, d, kept_columns, index, conv1d),  # noqa: B023
                (x, merged, delta))


def test_active_columns_path_equals_dense_path():
    """Skipping the columns gated off in every expert changes nothing but the work done."""
    g = torch.Generator().manual_seed(0)
    active = torch.tensor([0, 2, 3, 6])
    for conv1d, shape in ((False, (5, 8)), (True, (8, 5))):
        x = torch.randn(3, 4, 8, generator=g, requires_grad=True)
        merged = torch.rand(3, 1, 8, generator=g)
        merged[..., [1, 4, 5, 7]] = 0  # what r @ z gives where every expert's gate is 0
        merged.requires_grad_(True)
        delta = torch.randn(*shape, generator=g, requires_grad=True)
        grad_out = torch.randn(3, 4, 5, generator=g)
        results = []
        for cols in (None, active):
            y = MaskedDelta.apply(x, merged, delta, None, cols, conv1d)
            results.append((y, *torch.autograd.grad(y, (x, merged, delta), grad_out)))
        (y0, gx0, gm0, gd0), (y1, gx1, gm1, gd1) = results
        assert torch.allclose(y0, y1, atol=1e-6) and torch.allclose(gx0, gx1, atol=1e-6)
        assert torch.allclose(gd0, gd1, atol=1e-6)
        assert torch.allclose(gm0[..., active], gm1[..., active], atol=1e-6)
        assert (gm1[..., [1, 4, 5, 7]] == 0).all()


def test_layer_skips_columns_gated_off_in_every_expert():
    layer = SIMoELinear(nn.Linear(12, 9), M, 0.0, 0.0)
    with torch.no_grad():
        layer.log_alpha[:, :4] = -10.0  # deterministic gate 0 for every expert
    layer.eval()
    layer.set_routing(_routing())
    assert layer.active.tolist() == list(range(4, 12))
    with torch.no_grad():
        layer.log_alpha.fill_(0.0)
    layer.set_routing(_routing())
    assert layer.active is None  # all columns active: the dense path


@pytest.mark.parametrize("conv1d", [False, True])
def test_eval_mode_gathers_the_active_delta_once_and_computes_the_same(conv1d):
    """Decoding without autograd uses Δ's active columns gathered at set_routing; with autograd the
    layer takes its training path. Both give the same output."""
    torch.manual_seed(0)
    base = Conv1D(8, 16) if conv1d else nn.Linear(16, 8)
    layer = SIMoELinear(base, 3, 0.0, 0.1).eval()
    with torch.no_grad():
        layer.delta.normal_()
        layer.log_alpha[:, ::2] = -10.0  # half the columns off in every expert
    layer.set_routing(torch.softmax(torch.randn(4, 3), dim=-1))
    assert layer.active_delta.shape == (8, 8) and len(layer.active) == 8  # out 8 x 8 active columns
    x = torch.randn(4, 5, 16)
    training_path = layer(x)
    with torch.no_grad():
        cached = layer(x)
    torch.testing.assert_close(cached, training_path)
    layer.train().set_routing(torch.softmax(torch.randn(4, 3), dim=-1))
    assert layer.active_delta is None  # training always reads the live Δ


def test_active_columns_of_all_layers_at_once_equal_each_layers_own():
    """The batched rule (two host syncs per forward) picks the same columns as a per-layer nonzero,
    and says None for a layer that keeps every column; the model uses it, layer by layer equal."""
    from simoe.layer import active_columns

    g = torch.Generator().manual_seed(0)
    gates = [torch.rand(3, 5, generator=g) * (torch.rand(3, 5, generator=g) > 0.6), torch.ones(2, 4),
             torch.zeros(3, 6), torch.rand(2, 7, generator=g) * (torch.rand(2, 7, generator=g) > 0.8)]
    got = active_columns(gates)
    assert got[1] is None
    for i in (0, 2, 3):
        assert torch.equal(got[i], (gates[i] != 0).any(0).nonzero().squeeze(1)), i
    assert active_columns([]) == []

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=3))
    randomize_experts(model)
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.log_alpha[:, ::3] = -10.0  # a third of every layer's columns off
    model.eval().set_routing(torch.softmax(torch.randn(2, 3), dim=-1))
    for _, layer in model.routed_layers():
        if isinstance(layer, SIMoELinear):
            expected = layer.gates_on().any(0).nonzero().squeeze(1)
            assert torch.equal(layer.active, expected) and layer.active_delta is not None


def _explained_breaks(module, x) -> list[str]:
    explanation = torch._dynamo.explain(module)(x)
    return [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.slow
def test_simoe_layers_compile_without_graph_breaks():
    """torch.compile (CPU inductor) traces every SIMoE layer kind in one graph, training and
    decoding paths alike, and the compiled layer computes what the eager one does, gradients too."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    routing = torch.softmax(torch.randn(4, 3), dim=-1)
    x = torch.randn(4, 5, 16, requires_grad=True)
    layers = {"linear": SIMoELinear(nn.Linear(16, 8), 3, 0.0, 0.1),
              "conv1d": SIMoELinear(Conv1D(8, 16), 3, 0.0, 0.1),
              "rmsnorm": SIMoENorm(LlamaRMSNorm(16), 3, 0.0, 0.1),
              "gemma_norm": SIMoENorm(Gemma3RMSNorm(16), 3, 0.0, 0.1)}
    for name, layer in layers.items():
        with torch.no_grad():
            layer.delta.normal_()
            layer.log_alpha[:, ::2] = -10.0
        layer.set_routing(routing)
        assert _explained_breaks(layer, x) == [], name
        layer.eval().set_routing(routing)  # decoding: Δ's active columns gathered once
        with torch.no_grad():
            assert _explained_breaks(layer, x) == [], f"{name}, eval"
        layer.train().set_routing(routing)
    layer = layers["linear"]
    compiled = torch.compile(layer)
    eager_out = layer(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, layer.delta, layer.log_alpha),
                                      allow_unused=True)
    layer.set_routing(routing)  # a fresh m = r @ z: the first backward freed the last one's graph
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.delta, layer.log_alpha), allow_unused=True)
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads, strict=True):
        assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, atol=1e-5))
