import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model, train_without_dropout

from simoe import SIMoEConfig, hard_concrete, objectives, upcycle


def _expand(layer, gate_values):
    """Per-parameter gate values [M, numel]: a column gate covers every entry of its column."""
    w = layer.base.weight
    if w.dim() == 1:
        return gate_values
    in_dim = 0 if w.shape[0] == gate_values.shape[1] and w.shape[1] != gate_values.shape[1] else 1
    shape = (gate_values.shape[0], *w.shape)
    view = gate_values[:, :, None] if in_dim == 0 else gate_values[:, None, :]
    return view.expand(shape).reshape(gate_values.shape[0], -1)


def _model(arch="gpt2", m=4, regime="noise-free"):
    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=m, gate_regime=regime))
    randomize_experts(model)
    return model


def _noise_free(log_alpha):  # written out here rather than taken from the library
    return (torch.sigmoid(log_alpha / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)


@pytest.mark.parametrize("regime", hard_concrete.REGIMES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D (in x out) and Linear (out x in)
def test_densities_equal_per_parameter_reference(arch, regime):
    model = _model(arch, regime=regime)
    layers = list(model.routed_layers())
    ref = (hard_concrete.prob_nonzero if regime == "stochastic" else
           lambda la: (_noise_free(la) > 0).float())  # noise-free: P(z != 0) is 0 or 1
    p = torch.cat([_expand(lay, ref(lay.log_alpha)) for _, lay in layers], 1)
    eval_gates = hard_concrete.deterministic if regime == "stochastic" else _noise_free
    on = torch.cat([_expand(lay, eval_gates(lay.log_alpha)) for _, lay in layers], 1) > 0
    expert, union = objectives.expected_density(layers)
    assert torch.allclose(expert, p.mean(1), atol=1e-6)
    assert torch.allclose(union, (1 - (1 - p).prod(0)).mean(), atol=1e-6)
    if regime == "noise-free":  # the evaluated density exactly
        assert torch.allclose(union, on.any(0).float().mean(), atol=1e-6)
    counts, union_count, total = objectives.deterministic_nonzero(layers)
    assert total == p.shape[1]
    assert counts.tolist() == on.sum(1).tolist() and union_count == int(on.any(0).sum())
    report = model.sparsity_report()
    assert report["upcycled_params"] == total
    assert [e["nonzero_params"] for e in report["experts"]] == counts.tolist()
    assert report["union"]["deterministic_density"] == pytest.approx(union_count / total)


@pytest.mark.parametrize("regime", hard_concrete.REGIMES)
def test_orthogonality_equals_parameter_weighted_cosine(regime):
    model = _model("llama", regime=regime)
    layers = list(model.routed_layers())
    expected = hard_concrete.expected if regime == "stochastic" else _noise_free
    ez = torch.cat([_expand(lay, expected(lay.log_alpha)) for _, lay in layers], 1)
    cos = torch.nn.functional.cosine_similarity(ez[:, None, :], ez[None, :, :], dim=-1)
    i, j = torch.triu_indices(4, 4, offset=1)
    assert torch.allclose(objectives.orthogonality(layers), cos[i, j].mean(), atol=1e-5)
    # identical experts: cosine 1; one expert: nothing to be orthogonal to
    with torch.no_grad():
        for _, lay in layers:
            lay.log_alpha.copy_(lay.log_alpha[:1].expand_as(lay.log_alpha))
    assert objectives.orthogonality(layers).item() == pytest.approx(1.0, abs=1e-5)


def test_target_density_warmup():
    assert objectives.target_density(0, 100, 0.25) == 1.0
    assert objectives.target_density(50, 100, 0.25) == pytest.approx(0.625)
    assert objectives.target_density(100, 100, 0.25) == 0.25
    assert objectives.target_density(7, 0, 0.25) == 0.25


def test_lagrangian_ascends_multipliers():
    lag = objectives.SparsityLagrangian(2)
    opt = torch.optim.SGD(lag.parameters(), lr=0.1)
    lag(torch.tensor([0.9, 0.1]), target=0.5).backward()
    opt.step()
    # ascent where the budget d <= t is exceeded; a density under budget leaves λ alone
    assert lag.lambda1.tolist() == pytest.approx([0.04, 0.0])
    assert lag.lambda2.tolist() == pytest.approx([0.016, 0.0])


@pytest.mark.parametrize("regime", hard_concrete.REGIMES)
@pytest.mark.parametrize("scope", ["union", "expert"])
def test_lagrangian_alone_reaches_target_density(scope, regime):
    """With only the sparsity term, expected density falls to the budget (and, with nothing pulling
    it back up, at most a little below it: Adam's momentum); test_train.py shows it settling with the NLL."""
    config = SIMoEConfig(num_experts=4, target_sparsity=0.75, sparsity_scope=scope, gate_regime=regime)
    model = upcycle(tiny_model("llama"), config)
    layers = list(model.routed_layers())
    lag = objectives.SparsityLagrangian.for_config(config)
    opt = torch.optim.Adam([
        {"params": model.parameter_groups()["mask_logits"], "lr": 0.05},
        {"params": lag.parameters(), "lr": 0.05},
    ])
    warmup, steps = 100, 400
    for step in range(steps):
        t = objectives.target_density(step, warmup, config.target_density)
        loss = lag(objectives.constrained_density(layers, config.sparsity_scope), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_mask_logits_()
    expert, union = objectives.expected_density(layers)
    reached = union if scope == "union" else expert
    if regime == "noise-free":  # the equality settles at the target (and d is the evaluated density)
        assert (reached - 0.25).abs().max().item() <= 0.02, reached
    else:
        assert reached.max().item() <= 0.26 and reached.min().item() >= 0.15, reached


def test_one_optimizer_step_moves_simoe_tensors_only():
    model = _model("llama")
    train_without_dropout(model)
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters()
              if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lag = objectives.SparsityLagrangian(1)
    groups = model.parameter_groups()
    opt = torch.optim.AdamW([{"params": groups["delta"], "lr": 1e-3},
                             {"params": groups["mask_logits"], "lr": 1e-1},
                             {"params": groups["router"], "lr": 1e-3},
                             {"params": lag.parameters(), "lr": 1e-2}], weight_decay=0.0)
    ids = torch.randint(3, VOCAB, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    prompt_mask = (labels == -100).long()
    out = model(input_ids=ids, prompt_mask=prompt_mask, labels=labels)
    _, union = objectives.expected_density(model.routed_layers())
    loss = out.loss + lag(union, 0.9) + objectives.orthogonality(model.routed_layers())
    loss.backward()
    opt.step()
    for n, p in model.base_model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed == set(before)  # every Δ, every log α and every router tensor moved


def test_every_consumer_takes_its_gates_from_the_one_gate_function(monkeypatch):
    """Evaluation, the sparsity report, the export's parameter count, the analyses and generation's
    forward all see a change made to hard_concrete.gates alone."""
    from simoe.analysis.compute import expert_overlap, nonzero_share
    from simoe.parameters import parameter_report

    model = _model("llama").eval()
    real = hard_concrete.gates

    def expert0_off(log_alpha, regime, training, generator=None):
        z = real(log_alpha, regime, training, generator)
        return torch.cat([torch.zeros_like(z[:1]), z[1:]])

    monkeypatch.setattr(hard_concrete, "gates", expert0_off)
    report = model.sparsity_report()
    assert report["experts"][0]["nonzero_params"] == 0 and report["experts"][1]["nonzero_params"] > 0
    assert nonzero_share(model)["overall"]["experts"][0] == 0.0
    assert expert_overlap(model)[0, 1] == 0.0
    counts = parameter_report(model)
    assert counts["nonzero_delta_params"] == report["union"]["nonzero_params"]
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        routed_to_0 = model(input_ids=ids, routing=torch.tensor([[1.0, 0, 0, 0]])).logits
        monkeypatch.setattr(hard_concrete, "gates", real)
        with model.bypass():
            base = model.base_model(input_ids=ids).logits
    assert torch.equal(routed_to_0, base)  # expert 0's gates all 0: the model is the base model
