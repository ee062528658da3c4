"""`simoe generate` and `simoe export` on a tiny SIMoE checkpoint, against direct library calls."""

import json

import pytest
import torch
from conftest import VOCAB, char_tokenizer, save_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from simoe import SIMoEModel
from simoe.cli import main
from simoe.data import render_prompt
from simoe.inference.export import MERGE_INFO_NAME, REPORT_NAME
from simoe.inference.loading import load_for_inference, load_prompts

M = 4
PROMPTS = ["Add: 2 + 3", "Reverse the word: ocean", "Hi"]
NEW = 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base, ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("inference"), num_experts=M)
    return {"base": base, "ckpt": ckpt}


def _reference(dirs) -> SIMoEModel:
    """The checkpoint loaded by hand, as the library documents it (not through simoe.inference)."""
    return SIMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"]), dirs["ckpt"]).eval()


def _greedy(model, tokenizer, text, **kwargs) -> str:
    ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": text}])])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         do_sample=False, eos_token_id=[2], pad_token_id=0, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _cli_lines(capsys, argv) -> list[dict]:
    main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_load_for_inference_tells_checkpoints_from_plain_models(dirs):
    model, tokenizer = load_for_inference(dirs["ckpt"])
    assert isinstance(model, SIMoEModel) and not model.training
    assert model.simoe_config.num_experts == M
    reference = _reference(dirs)
    assert all(torch.equal(a, b) for a, b in zip(model.routed_state_dict().values(),
                                                   reference.routed_state_dict().values(), strict=True))
    assert tokenizer("Hi").input_ids == char_tokenizer()("Hi").input_ids
    plain, _ = load_for_inference(dirs["base"])
    assert not isinstance(plain, SIMoEModel)


def test_generate_equals_direct_model_generate(dirs, capsys, tmp_path):
    out_file = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", dirs["ckpt"], "--max_new_tokens", str(NEW), "--batch_size", "2",
            "--output", str(out_file)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    lines = _cli_lines(capsys, argv)
    model, tokenizer = _reference(dirs), char_tokenizer()
    assert [line["prompt"] for line in lines] == PROMPTS
    # one prompt at a time, unpadded: batching and left padding must not change the answers
    assert [line["response"] for line in lines] == [_greedy(model, tokenizer, p) for p in PROMPTS]
    assert any(line["response"] for line in lines)
    for line, p in zip(lines, PROMPTS, strict=True):
        ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": p}])])
        assert line["routing"] == pytest.approx(model.route(ids)[0].tolist(), abs=1e-6)
    assert [json.loads(x) for x in out_file.read_text().splitlines()] == lines


def test_generate_with_fixed_routing_equals_one_hot_routing(dirs, capsys):
    routed = _cli_lines(capsys, ["generate", "--checkpoint", dirs["ckpt"], "--max_new_tokens", str(NEW),
                                 *[a for p in PROMPTS for a in ("--prompt", p)]])
    fixed = _cli_lines(capsys, ["generate", "--checkpoint", dirs["ckpt"], "--max_new_tokens", str(NEW),
                                "--routing", "expert:0", *[a for p in PROMPTS for a in ("--prompt", p)]])
    model, tokenizer = _reference(dirs), char_tokenizer()
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert [line["response"] for line in fixed] == [_greedy(model, tokenizer, p, routing=one_hot)
                                                    for p in PROMPTS]
    assert all(line["routing"] == [1.0, 0.0, 0.0, 0.0] for line in fixed)
    assert [line["response"] for line in fixed] != [line["response"] for line in routed]


def test_prompts_file_accepts_every_record_format(dirs, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": PROMPTS[0]},
        {"prompt": PROMPTS[1], "completion": "naeco"},
        {"messages": [{"role": "user", "content": PROMPTS[2]}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"instruction": "Sort", "input": "c a b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    prompts = load_prompts(path)
    assert [m for m, _ in prompts] == [
        [{"role": "user", "content": PROMPTS[0]}], [{"role": "user", "content": PROMPTS[1]}],
        [{"role": "user", "content": PROMPTS[2]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Sort\n\nc a b"}],
    ]
    assert [o for _, o in prompts] == [f"{path}:line {n}" for n in range(1, 6)]
    lines = _cli_lines(capsys, ["generate", "--checkpoint", dirs["ckpt"], "--max_new_tokens", str(NEW),
                                "--prompts_file", str(path)])
    model, tokenizer = _reference(dirs), char_tokenizer()
    assert [line["response"] for line in lines[:3]] == [_greedy(model, tokenizer, p) for p in PROMPTS]

    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", dirs["ckpt"], "--prompts_file", str(path)])
    assert e.value.code == 2
    assert f"simoe generate: error: {path}:line 2: cannot tell the data format" in capsys.readouterr().err


def test_routing_needs_a_simoe_model(dirs, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", dirs["base"], "--prompt", "Hi", "--routing", "expert:0"])
    assert e.value.code == 2
    assert "needs a SIMoE model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", dirs["ckpt"], "--prompt", "Hi", "--routing", "expert:4"])
    assert "expert K=4 outside [0, 4)" in capsys.readouterr().err


def test_merged_export_is_a_plain_model_that_generates_as_the_fixed_routing(dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    main(["export", "--checkpoint", dirs["ckpt"], "--mode", "merged", "--routing", "expert:1",
          "--output_dir", str(out)])
    assert json.loads(capsys.readouterr().out)["routing"] == [0.0, 1.0, 0.0, 0.0]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)  # the export is a complete HF model directory
    model = _reference(dirs)
    routing = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    answers = [_greedy(plain, tokenizer, p) for p in PROMPTS]
    assert answers == [_greedy(model, char_tokenizer(), p, routing=routing) for p in PROMPTS]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, routing=routing.expand(2, M)).logits
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)
    # and the merged model is not simply the base
    base = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    base_answers = [_greedy(base, tokenizer, p) for p in PROMPTS]
    assert answers != base_answers


def test_merged_export_with_dataset_routing_uses_the_mean_prompt_routing(dirs, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "x"}] for p in PROMPTS]
    chats[2] += [{"role": "user", "content": "And again?"}, {"role": "assistant", "content": "y"}]
    data.write_text("\n".join(json.dumps({"messages": c}) for c in chats) + "\n")
    out = tmp_path / "merged"
    main(["export", "--checkpoint", dirs["ckpt"], "--mode", "merged", "--routing", f"dataset:{data}",
          "--batch_size", "2", "--output_dir", str(out)])
    capsys.readouterr()
    model, tokenizer = _reference(dirs), char_tokenizer()
    # each conversation routes on its prompt before the first response, as in training
    per_prompt = [model.route(torch.tensor([render_prompt(tokenizer, c[:1])]))[0] for c in chats]
    expected = torch.stack(per_prompt).double().mean(0)
    saved = json.loads((out / MERGE_INFO_NAME).read_text())["routing"]
    assert saved == pytest.approx(expected.tolist(), abs=1e-6)
    assert abs(sum(saved) - 1) < 1e-6 and max(saved) < 0.999  # a real mixture, not one expert


def test_compact_export_reloads_with_the_same_logits(dirs, tmp_path, capsys):
    out = tmp_path / "compact"
    main(["export", "--checkpoint", dirs["ckpt"], "--mode", "compact", "--output_dir", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / REPORT_NAME).read_text())
    assert report["kept_columns"] < report["total_columns"]  # randomize_experts gates some columns off
    compact, tokenizer = load_for_inference(out)
    assert isinstance(compact, SIMoEModel)
    assert tokenizer("Hi").input_ids == char_tokenizer()("Hi").input_ids  # the export carries it
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(compact(input_ids=ids).logits, _reference(dirs)(input_ids=ids).logits)
    lines = _cli_lines(capsys, ["generate", "--checkpoint", str(out), "--prompt", PROMPTS[0],
                                "--max_new_tokens", str(NEW)])
    assert lines[0]["response"] == _greedy(_reference(dirs), char_tokenizer(), PROMPTS[0])


def test_export_argument_errors(dirs, tmp_path, capsys):
    cases = [
        (["--mode", "merged"], "--mode merged needs --routing"),
        (["--mode", "compact", "--routing", "expert:0"], "--routing is for --mode merged"),
        (["--mode", "merged", "--routing", "weights:1,2"],
         "routing 'weights:1,2': 2 weights given, the model has 4 experts"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["export", "--checkpoint", dirs["ckpt"], "--output_dir", str(tmp_path / "x"), *extra])
        assert e.value.code == 2
        assert f"simoe export: error: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", dirs["base"], "--mode", "compact",
              "--output_dir", str(tmp_path / "y")])
    assert "is not a SIMoE checkpoint" in capsys.readouterr().err


def test_sampling_options_reach_generate(dirs, capsys):
    argv = ["generate", "--checkpoint", dirs["ckpt"], "--max_new_tokens", str(NEW), "--prompt", PROMPTS[1]]
    sampled = [_cli_lines(capsys, [*argv, "--do_sample", "--temperature", "1.5", "--top_k", "50",
                                   "--seed", str(seed)])[0]["response"] for seed in (0, 0, 1, 2, 3)]
    assert sampled[0] == sampled[1]  # the seed makes sampling reproducible
    assert len(set(sampled)) > 1  # and sampling does sample
    beams = _cli_lines(capsys, [*argv, "--num_beams", "3"])[0]["response"]
    assert beams == _greedy(_reference(dirs), char_tokenizer(), PROMPTS[1], num_beams=3)


def test_a_damaged_or_missing_checkpoint_is_a_one_line_error(dirs, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(dirs["ckpt"], damaged)
    weights = damaged / "simoe_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases = [(["generate", "--checkpoint", str(damaged), "--prompt", "Hi"],
              f"simoe generate: error: {weights}: not a readable safetensors file"),
             (["export", "--checkpoint", str(damaged), "--mode", "compact", "--output_dir", str(tmp_path)],
              f"simoe export: error: {weights}: not a readable safetensors file"),
             (["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "Hi"],
              f"simoe generate: error: {tmp_path / 'missing'}: no such directory")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err  # after the base-loading progress bar
