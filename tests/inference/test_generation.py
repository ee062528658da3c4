import pytest
import torch
from conftest import PROMPTS, chat_records, tiny_model, tiny_simoe

from simoe.data import render_prompt
from simoe.evaluation.families import exact_match, exact_match_by_group, score_by_group
from simoe.inference.generation import generate


def _chats(texts):
    return [[{"role": "user", "content": t}] for t in texts]


@pytest.mark.parametrize("kind", ["hf", "simoe"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tokenizer, kind):
    model = tiny_model("llama") if kind == "hf" else tiny_simoe()
    chats = _chats(PROMPTS)
    batched = generate(model, tokenizer, chats, max_new_tokens=6, batch_size=3)  # batches of 3 and 2
    singles = [generate(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in chats]
    assert batched == singles
    # the reference: greedy generation from the rendered prompt, only the new tokens decoded
    for chat, text in zip(chats, batched, strict=True):
        ids = torch.tensor([render_prompt(tokenizer, chat)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, eos_token_id=2, pad_token_id=0)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert any(batched)  # a random model writes something, so the comparison has content


def _greedy(model, ids: list[int], routing: torch.Tensor, steps: int = 6, eos: int = 2) -> list[int]:
    """The reference: greedy decoding by full forwards under a fixed routing, no cache."""
    seq = torch.tensor([ids])
    for _ in range(steps):
        token = int(model(input_ids=seq, routing=routing[None]).logits[0, -1].argmax())
        if token == eos:
            break
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return seq[0, len(ids):].tolist()


@torch.no_grad()
def test_simoe_generation_uses_each_prompts_own_routing(tokenizer):
    from simoe.inference.generation import generate_from_ids

    model = tiny_simoe()
    chats = _chats(PROMPTS)
    texts = generate(model, tokenizer, chats, max_new_tokens=6, batch_size=3)
    changed = 0
    for chat, text in zip(chats, texts, strict=True):
        ids = render_prompt(tokenizer, chat)
        own = model.route(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        reference = _greedy(model, ids, own)
        assert text == tokenizer.decode(reference, skip_special_tokens=True).strip()
        prompt = torch.tensor([ids])  # SIMoEModel.generate routes on the prompt by itself
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
        assert [t for t in out if t != 2] == reference
        other = torch.nn.functional.one_hot((own.argmax() + 1) % 4, 4).float()
        [out] = generate_from_ids(model, tokenizer, [ids], routing=other, max_new_tokens=6)
        expected = tokenizer.decode(_greedy(model, ids, other), skip_special_tokens=True).strip()
        assert out["response"] == expected
        changed += out["response"] != text
    assert changed > 0  # the routing matters to what is generated


def test_stops_at_the_model_generation_config_eos(tokenizer):
    model = tiny_model("llama")
    chat = _chats(["Hi"])
    ids = torch.tensor([render_prompt(tokenizer, chat[0])])
    free = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:]
    first = int(free[0])
    assert first != tokenizer.eos_token_id
    model.generation_config.eos_token_id = first  # a chat model's end-of-turn id, unlike the tokenizer's
    assert generate(model, tokenizer, chat, max_new_tokens=4) == [tokenizer.decode([first]).strip()]


def test_generate_restores_the_training_mode(tokenizer):
    model = tiny_simoe().train()
    generate(model, tokenizer, _chats(["Hi"]), max_new_tokens=2)
    assert model.training


def test_exact_match_rules():
    assert exact_match(" 42. ", "42")
    assert exact_match("d  i\n k", "d i k")
    assert exact_match("4.2", "4.2")
    assert not exact_match("42..", "42")  # only one trailing period goes
    assert not exact_match("saturday", "Saturday")  # case-sensitive
    assert not exact_match("The answer is 42", "42")


def test_score_by_group():
    records = chat_records(["a", "b", "c", "d"], ["g1", "g2", "g1", "g1"])
    for r, answer in zip(records, ["1", "2", "3", "4"], strict=True):
        r["messages"][-1]["content"] = answer
    assert score_by_group(records, ["1", "2", "x", "4."]) == {"g1": 2 / 3, "g2": 1.0}
    with pytest.raises(ValueError, match="record 1: field 'group'"):
        score_by_group([records[0], {**records[1], "group": ""}], ["1", "2"])
    with pytest.raises(ValueError, match="record 0: field 'messages'"):
        score_by_group([{"messages": [{"role": "user", "content": "q"}], "group": "g"}], ["1"])


def test_exact_match_by_group_scores_the_generations(tokenizer):
    model = tiny_model("llama")
    records = chat_records(PROMPTS, ["a", "b", "a", "b", "a"])
    predictions = generate(model, tokenizer, _chats(PROMPTS), max_new_tokens=4)
    for r, p in zip(records[:3], predictions, strict=False):
        r["messages"][-1]["content"] = p  # these three are right, the other two ("x") wrong
    assert exact_match_by_group(model, tokenizer, records, max_new_tokens=4, batch_size=2) == {
        "a": 2 / 3, "b": 1 / 2}
