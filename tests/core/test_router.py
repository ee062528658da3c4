"""The router reads prompt tokens only: never the response, never padding."""

import pytest
import torch
from conftest import VOCAB, randomize_experts, tiny_model

from simoe import SIMoEConfig, upcycle
from simoe.router import masked_mean

PROMPT, RESPONSE, PAD = 6, 4, 3


def _model(arch, router_input, **kw):
    model = upcycle(tiny_model(arch), SIMoEConfig(num_experts=4, router_input=router_input, **kw))
    randomize_experts(model)
    return model.eval()


def _pad(rows, side):
    """Pad token-id rows to one length on the given side; returns ids and attention mask."""
    length = max(len(r) for r in rows) + PAD
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("router_input", ["embedding-mean", "hidden-mean"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen3"])
def test_routing_reads_prompt_tokens_only(arch, router_input):
    model = _model(arch, router_input)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (PROMPT, PROMPT - 2)]
    responses = [torch.randint(3, VOCAB, (RESPONSE,), generator=g).tolist() for _ in prompts]
    other = [torch.randint(3, VOCAB, (RESPONSE + 2,), generator=g).tolist() for _ in prompts]

    def route(resp, side):
        ids, mask = _pad([p + r for p, r in zip(prompts, resp, strict=True)], side)
        prompt_mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(zip(prompts, resp, strict=True)):
            start = (ids.shape[1] - len(p) - len(r)) if side == "left" else 0
            prompt_mask[i, start : start + len(p)] = 1
        ids[mask == 0] = 5  # padding content must not matter either
        return model.route(ids, mask, prompt_mask)

    r = route(responses, "right")
    assert r.shape == (2, 4)
    assert torch.allclose(r.sum(-1), torch.ones(2))
    assert not torch.allclose(r[0], r[1], atol=1e-3)  # the router does read the prompt
    assert torch.allclose(route(other, "right"), r, atol=1e-6)  # other responses
    assert torch.allclose(route(responses, "left"), r, atol=1e-6)  # other padding side
    # with no prompt_mask, every attended token is prompt (generation)
    ids, mask = _pad(prompts, "left")
    assert torch.allclose(model.route(ids, mask), r, atol=1e-6)


def test_routing_is_held_for_every_position_and_can_be_overridden():
    model = _model("llama", "embedding-mean")
    ids = torch.randint(3, VOCAB, (2, 8))
    expert0 = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    with torch.no_grad():
        a = model(input_ids=ids, routing=expert0).logits
        for _, layer in model.routed_layers():  # m = z_0 for every example under that routing
            assert torch.equal(layer.merged_gates[0], layer.merged_gates[1])
            assert torch.equal(layer.merged_gates[0], layer.gates()[0])
        b = model(input_ids=ids).logits
    assert not torch.allclose(a, b)


def test_temperature_sharpens_routing():
    model = _model("llama", "embedding-mean")
    ids = torch.randint(3, VOCAB, (3, 8))
    soft = model.route(ids)
    model.set_router_temperature(0.05)
    sharp = model.route(ids)
    assert (sharp.max(-1).values > soft.max(-1).values).all()


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match=r"example\(s\) \[1\]"):
        masked_mean(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_hidden_mean_is_a_partial_forward_of_the_base(arch):
    """The router's layer runs under the base weights; no later layer and no lm_head runs."""
    model = _model(arch, "hidden-mean", router_hidden_layer=0)
    decoder_layers = next(m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList))
    assert model._router_layer is decoder_layers[0]
    calls = []
    hook = decoder_layers[-1].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        r = model.route(ids)
        captured = {}
        grab = model._router_layer.register_forward_hook(
            lambda m, a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out))
        with model.bypass():
            model.base_model(input_ids=ids)
        grab.remove()
    hook.remove()
    assert len(calls) == 1  # only the reference forward reached the last layer
    expected = model.router(captured["h"].float().mean(dim=1))
    assert torch.allclose(r, expected, atol=1e-6)


SYSTEM_TEMPLATE = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_router_reads_the_user_turn_the_same_way_in_training_and_generation():
    """router_span 'user' skips the template's fixed text (a default system prompt, role headers)
    wherever the prompt comes from: training features (prompt_mask) or a generation prompt."""
    from conftest import char_tokenizer

    from simoe.data import render_prompt, template_affixes, tokenize_record
    from simoe.inference.generation import pad_left

    tok = char_tokenizer(SYSTEM_TEMPLATE)
    prefix, suffix = template_affixes(tok)
    assert tok.decode(prefix) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4), tokenizer=tok)
    assert model.simoe_config.template_prefix_ids == prefix
    randomize_experts(model)
    model.eval()
    users = ["Sort: c a b", "Reverse the word ocean"]
    messages = [[{"role": "user", "content": u}] for u in users]
    ids, mask = pad_left([render_prompt(tok, m) for m in messages], tok.pad_token_id)
    with torch.no_grad():
        routed = model.route(ids, mask)
        # reference: the router on the mean embedding of the user text's tokens alone
        user_ids = [tok(u, add_special_tokens=False)["input_ids"] for u in users]
        emb = model.base_model.get_input_embeddings()
        reference = torch.cat([model.router(emb(torch.tensor(u)).mean(0, keepdim=True)) for u in user_ids])
        assert torch.allclose(routed, reference, atol=1e-6)
        # training features: right-padded, with the response after the prompt
        rows = [tokenize_record({"messages": [*m, {"role": "assistant", "content": "ok"}]}, tok, 200)
                for m in messages]
        width = max(len(r["input_ids"]) for r in rows)
        batch = {k: torch.tensor([r[k] + [0] * (width - len(r[k])) for r in rows])
                 for k in ("input_ids", "attention_mask", "prompt_mask")}
        assert torch.allclose(model.route(**batch), reference, atol=1e-6)
        # 'prompt' reads every prompt token, the template's too
        model.simoe_config.router_span = "prompt"
        assert not torch.allclose(model.route(ids, mask), reference, atol=1e-3)


def test_skip_template_keeps_rows_without_the_template():
    from simoe.router import skip_template

    ids = torch.tensor([[0, 7, 8, 5, 6, 9], [5, 6, 5, 6, 9, 9], [0, 0, 0, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    kept = skip_template(ids, mask, prefix=[7, 8], suffix=[9])
    assert kept.tolist() == [[0, 0, 0, 1, 1, 0],   # prefix and suffix dropped
                             [1, 1, 1, 1, 1, 0],   # no prefix: kept; suffix dropped
                             [0, 0, 0, 1, 1, 1]]   # nothing between them: the whole span is kept


def test_routing_information_is_the_mutual_information_of_prompt_and_expert():
    import math

    from simoe.objectives import routing_information

    assert routing_information(torch.full((4, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    assert routing_information(torch.eye(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 1
    assert routing_information(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_routing_balance_is_kl_from_uniform_and_pulls_a_starved_expert_back():
    import math

    from simoe.objectives import routing_balance, routing_information

    assert routing_balance(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    assert routing_balance(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)  # balanced load
    load = torch.tensor([0.4, 0.3, 0.2, 0.1])
    reference = sum(0.25 * math.log(0.25 / p) for p in load.tolist())
    assert routing_balance(load.expand(5, 4)).item() == pytest.approx(reference, rel=1e-5)

    # Expert 3 starved (r ~ e^-12): the balance term's gradient on its logit stays ~ 1/M,
    # the routing information's (through H(mean r)) all but vanishes.
    logits = torch.tensor([[6.0, 0.0, 0.0, -6.0], [0.0, 6.0, 0.0, -6.0]], requires_grad=True)
    routing_balance(torch.softmax(logits, -1)).backward()
    assert -logits.grad[:, 3].sum().item() == pytest.approx(1 / 4, rel=0.01)
    logits.grad = None
    (-routing_information(torch.softmax(logits, -1))).backward()
    assert abs(logits.grad[:, 3].sum().item()) < 1e-3
