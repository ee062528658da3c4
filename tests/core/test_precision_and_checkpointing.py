import torch
from conftest import VOCAB, randomize_experts, tiny_model, train_without_dropout

from simoe import SIMoEConfig, upcycle


def _grads(model, ids, checkpointing):
    if checkpointing:
        model.base_model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        model.base_model.gradient_checkpointing_disable()
    model.zero_grad()
    torch.manual_seed(0)  # same sampled gates in both runs
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_recomputes_with_the_sampled_gates():
    # stochastic gates: recomputation must reuse the forward's samples, not draw new ones
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=3, gate_regime="stochastic"))
    randomize_experts(model)
    train_without_dropout(model)
    ids = torch.randint(3, VOCAB, (2, 10))
    plain, checkpointed = _grads(model, ids, False), _grads(model, ids, True)
    assert model.base_model.is_gradient_checkpointing
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_bf16_base_keeps_fp32_simoe_state_and_equals_base_at_init():
    base = tiny_model("gemma3").to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = upcycle(base, SIMoEConfig(num_experts=3))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
    randomize_experts(model)
    train_without_dropout(model)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    layer = next(layer for _, layer in model.routed_layers())
    assert layer.delta.grad.dtype == torch.float32 and layer.delta.grad.abs().sum() > 0
