import math

import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model, train_without_dropout
from transformers.pytorch_utils import Conv1D

from simoe import SIMoEConfig, SIMoELinear, SIMoENorm, upcycle


def _batch(seed=0, batch=3, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


def test_upcycled_logits_equal_base(arch):
    ids, mask = _batch()
    base = tiny_model(arch)
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
    model = upcycle(base, SIMoEConfig(num_experts=4))
    for train in (False, True):  # deterministic gates, then sampled gates: Δ = 0 either way
        train_without_dropout(model) if train else model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert (logits - reference).abs().max() <= 1e-6


def test_every_linear_and_norm_is_upcycled_by_type(arch):
    base = tiny_model(arch)
    linears = {n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    output = {n for n, m in base.named_modules() if m is base.get_output_embeddings()}
    model = upcycle(base, SIMoEConfig(num_experts=3))
    layers = dict(model.routed_layers())
    wrapped = {n for n, layer in layers.items() if isinstance(layer, SIMoELinear)}
    assert wrapped == linears - output
    norms = [layer for layer in layers.values() if isinstance(layer, SIMoENorm)]
    assert len(norms) >= 2 * 2 + 1  # two per decoder layer at least, and the final norm
    for layer in layers.values():
        w = layer.base.weight
        assert layer.delta.shape == w.shape and layer.delta.dtype == torch.float32
        assert not w.requires_grad and layer.delta.requires_grad and layer.log_alpha.requires_grad
        if w.dim() == 1:
            assert layer.log_alpha.shape == (3, w.shape[0])
        else:
            in_features = w.shape[0] if isinstance(layer.base, Conv1D) else w.shape[1]
            assert layer.log_alpha.shape == (3, in_features)


def test_target_modules_list_regex_and_norm_switch():
    model = upcycle(tiny_model("llama"), SIMoEConfig(target_modules=["q_proj", "v_proj"],
                                                     upcycle_norms=False))
    names = [n for n, _ in model.routed_layers()]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]

    model = upcycle(tiny_model("llama"), SIMoEConfig(target_modules=r".*\.mlp\.(up|down)_proj",
                                                     upcycle_norms=False))
    assert [n for n, _ in model.routed_layers()] == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")
    ]
    # a norm can be targeted by name even with upcycle_norms off
    model = upcycle(tiny_model("llama"), SIMoEConfig(target_modules=["norm"], upcycle_norms=False))
    assert [n for n, _ in model.routed_layers()] == ["model.norm"]


def test_clear_errors_on_bad_input():
    with pytest.raises(ValueError, match="num_experts"):
        SIMoEConfig(num_experts=0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="target_sparsity"):
            SIMoEConfig(target_sparsity=bad)
    with pytest.raises(ValueError, match=r"\['qq_proj'\].*module names that exist: .*'q_proj'"):
        upcycle(tiny_model("llama"), SIMoEConfig(target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM matches"):
        upcycle(tiny_model("llama"), SIMoEConfig(target_modules=r"nothing\.here", upcycle_norms=False))
    with pytest.raises(ValueError, match="regex"):
        upcycle(tiny_model("llama"), SIMoEConfig(target_modules="(unclosed"))
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(upcycle(tiny_model("llama")).base_model)
    with pytest.raises(ValueError, match="router_input"):
        SIMoEConfig(router_input="cls-token")


def test_only_simoe_tensors_are_trainable():
    base = tiny_model("gpt2")
    n_base = sum(p.numel() for p in base.parameters())
    model = upcycle(base, SIMoEConfig(num_experts=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = model.parameter_groups()
    assert sum(len(v) for v in groups.values()) == len(trainable)
    assert all(n.endswith((".delta", ".log_alpha")) or n.startswith("router.") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == n_base


def test_noise_free_gates_are_the_same_in_train_and_eval():
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    ids, mask = _batch()
    with torch.no_grad():
        a = model.eval()(input_ids=ids, attention_mask=mask).logits
        train_without_dropout(model)
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    # the stochastic regime's samples differ from the evaluation gates
    for _, layer in model.routed_layers():
        layer.regime = "stochastic"
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, a, atol=1e-4)


def test_train_mode_samples_gates_and_eval_is_deterministic():
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4, gate_regime="stochastic"))
    randomize_experts(model)
    ids, mask = _batch()
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    train_without_dropout(model)
    with torch.no_grad():
        c = model(input_ids=ids, attention_mask=mask).logits
        d = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(c, d)


def test_unreachable_sparsity_target_is_refused():
    # SMAT's bound ln 0.01 keeps P(z != 0) >= 0.047, so 8 experts' union stays above 32 %
    with pytest.raises(ValueError, match=r"target density 0.250 is unreachable.*0.320"):
        SIMoEConfig(num_experts=8, target_sparsity=0.75, mask_logit_min=math.log(0.01),
                    gate_regime="stochastic")
    assert SIMoEConfig(num_experts=8, target_sparsity=0.75, gate_regime="stochastic").density_floor < 0.01
    # per expert, the same bound is fine; noise-free gates reach exactly 0 above it
    SIMoEConfig(num_experts=8, target_sparsity=0.75, mask_logit_min=math.log(0.01),
                sparsity_scope="expert", gate_regime="stochastic")
    assert SIMoEConfig(num_experts=8, mask_logit_min=math.log(0.01)).density_floor == 0.0
    with pytest.raises(ValueError, match="unreachable"):
        SIMoEConfig(mask_logit_min=-1.5)  # the noise-free gate is 0 only below -1.599


def test_options_of_the_other_gate_regime_are_refused():
    with pytest.raises(ValueError, match="mask_init_density does not apply to gate_regime 'noise-free'"):
        SIMoEConfig(mask_init_density=0.5)
    with pytest.raises(ValueError, match="mask_init_gate does not apply to gate_regime 'stochastic'"):
        SIMoEConfig(gate_regime="stochastic", mask_init_gate=0.5)
    # the initial gate: noise-free z = mask_init_gate at step 0, in train and eval alike
    model = upcycle(tiny_model("llama"), SIMoEConfig(mask_init_gate=0.3, mask_init_std=0.0))
    for _, layer in model.routed_layers():
        assert torch.allclose(layer.eval_gates(), torch.full_like(layer.log_alpha, 0.3), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_upcycled_norms_follow_the_targeted_layers(arch):
    """upcycle_norms adds the norms of the decoder layers target_modules reaches and the final norm,
    not those below the lowest targeted layer (they would make every backward run full depth)."""
    from simoe.targets import decoder_layers, is_norm

    base = tiny_model(arch)
    blocks = decoder_layers(base)
    top = len(blocks) - 1
    config = SIMoEConfig(num_experts=2, target_modules=rf".*\.{top}\..*(q_proj|c_attn)")
    model = upcycle(base, config)
    names = {n for n, _ in model.routed_layers()}
    norms = {n for n in names if is_norm(dict(model.base_model.named_modules())[n].base)}
    assert norms and all(f".{top}." in n or not any(f".{i}." in n for i in range(len(blocks))) for n in norms)
    assert any(f".{top}." not in n for n in norms)  # the final norm
    # every norm with 'all-linear'
    every = upcycle(tiny_model(arch), SIMoEConfig(num_experts=2))
    assert sum(isinstance(m, SIMoENorm) for m in every.modules()) == sum(
        is_norm(m) for m in tiny_model(arch).modules())
