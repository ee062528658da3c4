import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model

from simoe import SIMoEConfig, upcycle
from simoe.inference.generation import pad_left

NEW = 8


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen3", "phi3", "gpt_neox"])
def test_left_padded_batch_generates_as_one_prompt_at_a_time(arch):
    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 6)]
    ids, mask = pad_left(prompts, pad_id=0)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
    singles = [model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              **kwargs)[0, len(p):] for p in prompts]
    assert torch.equal(batched, torch.stack(singles))
    # routing is what changes the output: a fixed expert gives other tokens for some prompt
    fixed = torch.zeros(len(prompts), 4)
    fixed[:, 0] = 1
    other = model.generate(input_ids=ids, attention_mask=mask, routing=fixed, **kwargs)[:, width:]
    assert not torch.equal(other, batched)


def test_generate_routes_once_from_the_prompt():
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    calls = []
    original = model.route
    model.route = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids = torch.randint(3, VOCAB, (2, 5))
    model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(calls) == 1


def test_beam_search_expands_each_prompt_routing_in_place():
    """num_beams repeats every prompt in place; each copy must keep its own prompt's routing."""
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, **kwargs)
    singles = torch.cat([model.generate(input_ids=ids[i : i + 1], **kwargs) for i in range(2)])
    assert batched.shape == (4, 11)
    assert torch.equal(batched, singles)


def test_manual_cached_decoding_needs_the_prompt_routing():
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        r = model.route(ids)
        out = model(input_ids=ids, routing=r, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match="routing=model.route"):
            model(input_ids=step, past_key_values=out.past_key_values)
        cached = model(input_ids=step, past_key_values=out.past_key_values, routing=r).logits[:, -1]
        full = model(input_ids=torch.cat([ids, step], 1), routing=r).logits[:, -1]
    assert torch.allclose(cached, full, atol=1e-5)
    generated = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, -1:], step)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_folded_weights_compute_the_routed_model(arch):
    """W0 + Δ·diag(m) folded into the weights (Linear, GPT-2's Conv1D, Gemma's 1 + g norms) gives
    the logits of the routed forward, and every base weight is the very same tensor afterwards."""
    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    routing = torch.tensor([0.1, 0.6, 0.0, 0.3])
    before = {name: (layer.base.weight, layer.base.weight.clone()) for name, layer in model.routed_layers()}
    with torch.no_grad():
        routed = model(input_ids=ids, routing=routing.expand(2, 4)).logits
        with model.folded(routing):
            folded = model.base_model(input_ids=ids).logits
            with pytest.raises(RuntimeError, match="folded"):
                model(input_ids=ids, routing=routing.expand(2, 4))
        base = model.base_model(input_ids=ids).logits  # the layers' routing is back in place
        with model.bypass():
            plain = model.base_model(input_ids=ids).logits  # the frozen base alone
    torch.testing.assert_close(folded, routed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(folded, plain, atol=1e-3)  # the experts do change the logits
    for name, layer in model.routed_layers():
        weight, copy = before[name]
        assert layer.base.weight is weight and torch.equal(weight, copy)
    torch.testing.assert_close(base, routed)


def test_a_tied_weight_is_folded_apart_from_the_module_it_is_tied_to():
    """Folding writes the weight columns in place, except a weight another module holds too: the
    output layer tied to the input embeddings gets a folded copy, the embeddings keep W0."""
    base = tiny_model("llama")
    base.lm_head.weight = base.model.embed_tokens.weight  # tied, as many small models ship
    model = upcycle(base, SIMoEConfig(num_experts=4, target_modules=["lm_head", "q_proj"]))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    routing = torch.tensor([0.1, 0.6, 0.0, 0.3])
    embeddings = base.model.embed_tokens.weight.clone()
    with torch.no_grad():
        routed = model(input_ids=ids, routing=routing.expand(2, 4)).logits
        with model.folded(routing):
            assert torch.equal(base.model.embed_tokens.weight, embeddings)
            folded = model.base_model(input_ids=ids).logits
    torch.testing.assert_close(folded, routed, rtol=1e-5, atol=1e-5)
    assert base.lm_head.base.weight is base.model.embed_tokens.weight
    assert torch.equal(base.model.embed_tokens.weight, embeddings)


def test_generate_folds_a_shared_routing_and_restores_the_weights_when_it_raises(monkeypatch):
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4))
    randomize_experts(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    shared = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(3, 4)
    folds = []
    original = model.folded
    monkeypatch.setattr(model, "folded", lambda r: folds.append(r) or original(r))
    out = model.generate(input_ids=ids, routing=shared, **kwargs)
    mixed = shared.clone()
    mixed[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert len(folds) == 1 and torch.equal(folds[0], shared[0])
    unfolded = model.generate(input_ids=ids, routing=mixed, **kwargs)  # per-example routings: no fold
    assert len(folds) == 1
    assert torch.equal(out[[0, 2]], unfolded[[0, 2]])  # the rows that kept the shared routing
    model.fold_shared_routing = False  # decode a shared routing on the masked path
    assert torch.equal(model.generate(input_ids=ids, routing=shared, **kwargs), out) and len(folds) == 1
    model.fold_shared_routing = True

    weights = {name: (layer.base.weight, layer.base.weight.clone()) for name, layer in model.routed_layers()}

    def failing_generate(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.base_model, "generate", failing_generate)
    with pytest.raises(KeyboardInterrupt):
        model.generate(input_ids=ids[:1], **kwargs)
    for name, layer in model.routed_layers():
        weight, copy = weights[name]
        assert layer.base.weight is weight and torch.equal(weight, copy)
    assert not model._folded
