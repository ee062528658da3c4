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
