"""`simoe eval sni` and `simoe eval perplexity`: official SNI scoring and token-weighted response NLL."""

import json
import math
import string

import pytest
import torch
from conftest import SHARED_DATA, char_tokenizer, save_tiny_checkpoint
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM

from simoe import SIMoEModel
from simoe.cli import main
from simoe.data import load_records, load_sni_tasks, render_prompt, sni_prompt, tokenize_record
from simoe.evaluation.metrics import exact_match, normalize_answer, rouge_l, score_files, score_references

SNI = SHARED_DATA / "sni"
TASKS = ["task036_qasc_topic_word_to_generate_related_fact", "task1152_bard_analogical_reasoning_causation",
         "task1158_bard_analogical_reasoning_manipulating_items"]  # 1 Keyword Tagging, 2 Word Analogy
CONTEXT, NEW = 128, 8  # the tiny models' max_position_embeddings, tokens generated


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base, ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("evaluation"))
    return {"base": base, "ckpt": ckpt}


# ---------------------------------------------------------------------------- official metrics
def test_official_normalisation_keeps_articles():
    assert normalize_answer("  The Cat,  sat!!\n") == "the cat sat"
    assert exact_match("The cat.", "the cat") == 1.0
    assert exact_match("don't", "dont") == 1.0  # punctuation is deleted, not replaced by a space
    assert exact_match("a cat", "cat") == 0.0  # unlike SQuAD, articles stay
    assert exact_match("cats", "cat") == 0.0


def test_rouge_l_uses_the_stemmer():
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert rouge_l("running dogs", "run dog") == 1.0
    assert rouge_l("", "anything") == 0.0


def test_scores_are_per_instance_means_x100_best_reference():
    def ref(i, task, category, refs):
        return {"id": i, "references": refs, "task_id": task, "task_category": category, "track": "default"}

    references = [
        ref("a1", "A", "Word Analogy", ["the cat sat on the mat"]),  # EM 0, ROUGE 2/3
        ref("a2", "A", "Word Analogy", ["Yes.", "no"]),  # EM 1, ROUGE 1
        ref("a3", "A", "Word Analogy", ["run dog"]),  # EM 0, ROUGE 1 (stemmed)
        ref("b1", "B", "Word Analogy", ["blue sky"]),  # no prediction: "", 0 and 0
        ref("c1", "C", "Title  Generation", ["a red car", "car"]),  # EM 1 and ROUGE 1, from "car"
        ref("c2", "C", "Title  Generation", ["big house"]),  # EM 0, ROUGE 1/2
    ]
    predictions = {"a1": "the cat sat", "a2": "yes", "a3": "running dogs", "c1": "Car!", "c2": "small house"}
    summary = score_references(predictions, references)
    approx = lambda x: pytest.approx(x, abs=1e-4)  # noqa: E731  (scores are rounded to 4 decimals)
    assert summary["exact_match"] == approx(100 * 2 / 6)
    assert summary["rougeL"] == approx(100 * (2 / 3 + 1 + 1 + 0 + 1 + 0.5) / 6)
    assert summary["per_task"]["A"] == {"exact_match": approx(100 / 3), "rougeL": approx(100 * (8 / 3) / 3),
                                        "instances": 3}
    assert summary["per_task"]["C"] == {"exact_match": 50.0, "rougeL": 75.0, "instances": 2}
    # a category is the mean over its instances (4 here), not over its tasks' means
    assert summary["per_category"] == {
        "word_analogy": {"exact_match": 25.0, "rougeL": approx(100 * (8 / 3) / 4), "instances": 4},
        "title_generation": {"exact_match": 50.0, "rougeL": 75.0, "instances": 2},
    }
    assert (summary["instances"], summary["tasks"], summary["missing_predictions"]) == (6, 3, 1)


# ---------------------------------------------------------------------------- simoe eval sni
def _recompute(predictions: list[dict], references: list[dict]) -> dict:
    """The official numbers, recomputed here from the written files with rouge_score directly."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    norm = lambda s: " ".join("".join(c for c in s.lower() if c not in string.punctuation).split())  # noqa: E731
    pred = {p["id"]: p["prediction"] for p in predictions}
    rows = [(r["task_id"], "_".join(r["task_category"].lower().split()),
             max(float(norm(pred[r["id"]]) == norm(g)) for g in r["references"]),
             max(scorer.score(g, pred[r["id"]])["rougeL"].fmeasure for g in r["references"]))
            for r in references]

    def mean(selected):
        return {"exact_match": round(100 * sum(r[2] for r in selected) / len(selected), 4),
                "rougeL": round(100 * sum(r[3] for r in selected) / len(selected), 4),
                "instances": len(selected)}

    overall = mean(rows)
    del overall["instances"]
    groups = lambda k: {g: mean([r for r in rows if r[k] == g]) for g in dict.fromkeys(r[k] for r in rows)}  # noqa: E731
    return {**overall, "per_task": groups(0), "per_category": groups(1)}


def _eval_sni(model_dir, out, capsys):
    main(["eval", "sni", "--model", model_dir, "--data", str(SNI), "--split", "test", "--max_instances", "2",
          "--tasks", ",".join(TASKS), "--max_new_tokens", str(NEW), "--batch_size", "4",
          "--output_dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    return summary, read("predictions.jsonl"), read("references.jsonl")


def test_eval_sni_on_base_and_checkpoint(dirs, tmp_path, capsys):
    results = {kind: _eval_sni(dirs[kind], tmp_path / kind, capsys) for kind in ("base", "ckpt")}
    tokenizer = char_tokenizer()
    tasks = load_sni_tasks(SNI, "test", 2)
    instances = [(t, inst) for t in tasks if t.name in TASKS for inst in t.instances]
    assert len(instances) == 6
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": sni_prompt(t.data, inst)}])
               for t, inst in instances]
    expected_prompts = [tokenizer.decode(ids[-(CONTEXT - NEW):]) for ids in prompts]  # cut from the left
    assert all(p.endswith("Output: <|im_end|>\n<|im_start|>assistant\n") for p in expected_prompts)
    for summary, predictions, references in results.values():
        assert references == [{"id": inst["id"], "references": inst["output"], "task_id": t.name,
                               "task_category": t.category, "track": "default"} for t, inst in instances]
        assert [p["id"] for p in predictions] == [inst["id"] for _, inst in instances]
        assert [p["prompt"] for p in predictions] == expected_prompts  # base and SIMoE: identical prompts
        assert summary == {**_recompute(predictions, references), "instances": 6, "tasks": 3,
                           "missing_predictions": 0,
                           "truncated_prompts": sum(len(ids) > CONTEXT - NEW for ids in prompts)}
        assert summary["per_category"]["word_analogy"]["instances"] == 4
    rescored = score_files(tmp_path / "ckpt" / "predictions.jsonl", tmp_path / "ckpt" / "references.jsonl")
    assert rescored == {k: v for k, v in results["ckpt"][0].items() if k != "truncated_prompts"}
    # a random model scores 0: rescore the written references against answers that score something
    _, predictions, references = results["ckpt"]
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        p["prediction"] = r["references"][-1].upper() if i % 2 else "The " + r["references"][0]
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    rescored = score_files(path, tmp_path / "ckpt" / "references.jsonl")
    assert 0 < rescored["exact_match"] < rescored["rougeL"] < 100
    assert rescored == {**_recompute(predictions, references), "instances": 6, "tasks": 3,
                        "missing_predictions": 0}
    # the checkpoint's answers are its own (the experts change the model)
    assert [p["prediction"] for p in results["base"][1]] != [p["prediction"] for p in results["ckpt"][1]]


def test_eval_sni_rejects_unknown_tasks(dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "sni", "--model", dirs["base"], "--data", str(SNI), "--tasks", "task999_nothing",
              "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    assert "simoe eval sni: error:" in (err := capsys.readouterr().err) and "task999_nothing" in err
    with pytest.raises(SystemExit):
        main(["eval", "sni", "--model", dirs["base"], "--data", str(SNI), "--max_new_tokens", "128",
              "--output_dir", str(tmp_path)])
    assert "leaves no room for a prompt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- simoe eval perplexity
@pytest.mark.parametrize("kind", ["base", "ckpt"])
def test_perplexity_is_exp_of_token_weighted_response_nll(dirs, tmp_path, capsys, kind):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "Add: 2 + 3", "completion": "5", "task": "math"},
            {"prompt": "Reverse the word: ocean", "completion": "naeco", "task": "words"},
            {"prompt": "Sort: c a b", "completion": "a b c, sorted alphabetically", "task": "words"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main(["eval", "perplexity", "--model", dirs[kind], "--data", str(data), "--batch_size", "2",
          "--output_dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())

    # by hand: one unpadded example at a time, log-softmax, the labelled tokens only
    base = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    model = SIMoEModel.from_pretrained(base, dirs["ckpt"]).eval() if kind == "ckpt" else base
    tokenizer = char_tokenizer()
    nll, tokens = {}, {}
    for record in load_records(data):
        f = tokenize_record(record, tokenizer, CONTEXT)
        ids = torch.tensor([f["input_ids"]])
        kwargs = {"prompt_mask": torch.tensor([f["prompt_mask"]])} if kind == "ckpt" else {}
        with torch.no_grad():
            logp = model(input_ids=ids, **kwargs).logits[0].log_softmax(-1)
        for t, label in enumerate(f["labels"]):
            if label != -100:
                nll[record["group"]] = nll.get(record["group"], 0.0) - float(logp[t - 1, label])
                tokens[record["group"]] = tokens.get(record["group"], 0) + 1
    total, count = sum(nll.values()), sum(tokens.values())
    assert count == 1 + 5 + len("a b c, sorted alphabetically") + 3  # + one end-of-turn token each
    assert summary["tokens"] == count and summary["examples"] == 3
    assert summary["nll"] == pytest.approx(total / count, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    for group in ("math", "words"):
        assert summary["per_group"][group]["nll"] == pytest.approx(nll[group] / tokens[group], rel=1e-5)
        assert summary["per_group"][group]["tokens"] == tokens[group]


def test_gate_gap_is_zero_for_noise_free_gates_and_not_for_sampled_ones():
    import datasets
    import torch
    from conftest import char_tokenizer, randomize_experts, tiny_model

    from simoe import SIMoEConfig, upcycle
    from simoe.data import tokenize_record
    from simoe.evaluation.perplexity import gate_gap

    tok = char_tokenizer()
    rows = [tokenize_record({"messages": [{"role": "user", "content": f"Add {i} and {i + 1}"},
                                          {"role": "assistant", "content": str(2 * i + 1)}]}, tok, 64)
            for i in range(6)]
    data = datasets.Dataset.from_list(rows)
    for regime in ("noise-free", "stochastic"):
        torch.manual_seed(0)
        model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=3, gate_regime=regime))
        randomize_experts(model)
        gap = gate_gap(model.eval(), tok, data, batch_size=4)
        assert not model.training  # modes come back
        if regime == "noise-free":
            assert gap["gap"] == 0.0 and gap["eval_gate_nll"] > 0
        else:
            assert abs(gap["gap"]) > 1e-3
