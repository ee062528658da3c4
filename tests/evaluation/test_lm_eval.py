"""The lm-eval ``simoe`` model scores continuations with experts routed on the context tokens only."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import save_tiny_checkpoint
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from simoe.evaluation.lm_eval import SIMoELM, evaluate

# (context, continuation): contexts of different lengths batched together, multi-token
# continuations, and one-token answers to one context (which share a row).
REQUESTS = [
    ("Q: What is 2 + 3?\nA:", " 5"),
    ("Q: What is 2 + 3?\nA:", " 6"),
    ("Q: What is 2 + 3?\nA:", " 7"),
    ("Q: Reverse the word ocean.\nA:", " naeco"),
    ("Q: Reverse the word ocean.\nA:", " ocean"),
    ("Hi", " there, friend"),
    ("The capital of France is", " Paris."),
]
DOCS = [
    {"question": "What is 2 + 3?", "choices": ["5", "6", "23"], "answer": 0},
    {"question": "Reverse: ocean", "choices": ["naeco", "ocean", "oce"], "answer": 0},
    {"question": "Colour of the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Is 7 prime?", "choices": ["no", "yes"], "answer": 1},
    {"question": "Sort: c a b", "choices": ["c a b", "a b c", "b a c"], "answer": 1},
]
TEXT = "Q: {{question}}\nA:"


def _save_checkpoint(root, router_input: str = "embedding-mean") -> str:
    """A SIMoE checkpoint (with its tokenizer, no chat template) whose config points to a saved tiny Llama."""
    return save_tiny_checkpoint(root, chat_template=None, router_input=router_input)[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _save_checkpoint(tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture(scope="module")
def lm(checkpoint) -> SIMoELM:
    return SIMoELM(pretrained=checkpoint, batch_size=3, device="cpu")


@torch.no_grad()
def _reference(model, tokenizer, context: str, continuation: str, route_on_continuation: bool = False):
    """(log-likelihood, greedy?) of one request, unbatched, routing on the context (or on everything)."""
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    routing = model.route(ids if route_on_continuation else ids[:, :len(ctx)])
    logprobs = model(input_ids=ids[:, :-1], routing=routing).logits[0, len(ctx) - 1:].log_softmax(-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_registered_as_simoe():
    assert get_model("simoe") is SIMoELM


def _check_loglikelihoods(lm):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got, strict=True):
        want, want_greedy = _reference(lm.model, lm.tokenizer, context, continuation)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
        # Routing on the continuation too gives other scores: the test above can tell them apart.
        leaked, _ = _reference(lm.model, lm.tokenizer, context, continuation, route_on_continuation=True)
        assert abs(ll - leaked) > 1e-3  # >= 4e-3 here; the two agree within 1e-5


def test_loglikelihoods_route_on_the_context_only(lm):
    _check_loglikelihoods(lm)


def test_hidden_mean_router_reads_the_context_only(tmp_path):
    # The router's partial forward runs over the whole row; causal attention keeps it to the context.
    _check_loglikelihoods(SIMoELM(pretrained=_save_checkpoint(tmp_path, "hidden-mean"), batch_size=3,
                                  device="cpu"))


def test_truncated_rows_route_on_the_context_tokens_they_keep(checkpoint):
    lm = SIMoELM(pretrained=checkpoint, batch_size=2, device="cpu", max_length=12)
    context, continuation = "Q: Reverse the word ocean.\nA:", " naeco"
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    # HFLM keeps the last max_length + 1 tokens of context + continuation, so 7 context tokens.
    tokens = lm.tokenizer.encode(context + continuation)[-13:]
    want, _ = _reference(lm.model, lm.tokenizer, lm.tokenizer.decode(tokens[:7]), continuation)
    assert ll == pytest.approx(want, abs=1e-4)


def test_generation_routes_each_prompt_without_its_padding(lm, monkeypatch):
    prompts = ["Q: What is 2 + 3?\nA:", "Hi"]  # batched together: "Hi" is left-padded
    routings = []
    set_routing = lm.model.set_routing
    monkeypatch.setattr(lm.model, "set_routing", lambda r: (routings.append(r), set_routing(r)))
    kwargs = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)])
    (batch,) = routings
    for prompt, text, routing in zip(prompts, got, batch, strict=True):
        ids = torch.tensor([lm.tokenizer.encode(prompt)])
        torch.testing.assert_close(routing, lm.model.route(ids)[0])
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False)
        assert text == lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


@pytest.mark.slow
def test_evaluate_runs_a_local_task_and_writes_its_metric(checkpoint, tmp_path, lm):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = {
        "task": "simoe_toy_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": TEXT,
        "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tasks / "simoe_toy_mc.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")

    results = evaluate(checkpoint, ["simoe_toy_mc"], str(tmp_path / "out"), batch_size=4,
                       include_path=str(tasks))

    written = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert written["results"] == json.loads(json.dumps(results["results"]))
    # The reference accuracy: the choice (after lm-eval's " " delimiter) with the highest
    # log-likelihood, each scored with routing from its question.
    correct = []
    for doc in DOCS:
        context = f"Q: {doc['question']}\nA:"
        lls = [_reference(lm.model, lm.tokenizer, context, " " + c)[0] for c in doc["choices"]]
        correct.append(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])
    assert written["results"]["simoe_toy_mc"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))
    assert written["config"]["simoe_checkpoint"] == checkpoint


@pytest.mark.slow
def test_evaluate_rejects_unknown_tasks(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no_such_task"):
        evaluate(checkpoint, ["no_such_task"], str(tmp_path / "out"), include_path=str(tmp_path))
