"""`simoe train --method X`: every baseline trains, saves, resumes and reloads through the same paths."""

import json

import pytest
import torch
from conftest import CHAT_RECORDS

from simoe.cli import main
from simoe.inference.loading import load_for_inference

BASELINES = ["full", "lora", "sparse-upcycling", "smear"]


def _train(model_dir, data, out, method, steps=2, extra=()):
    main(["train", "--method", method, "--model_name_or_path", model_dir, "--data", str(data),
          "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
          "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2", "--report_to", "none",
          "--use_cpu", "true", "--seed", "3",
          *(("--num_ffn_experts", "3") if method in ("sparse-upcycling", "smear") else ()), *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
    return path


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_saves_and_reloads_for_inference(method, tiny_dir, data, tmp_path):
    out = tmp_path / method
    _train(tiny_dir, data, out, method, steps=4)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == method and summary["parameters"]["trainable"] > 0
    nll = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(nll) == 4 and all(0 < x < 20 for x in nll)
    model, tokenizer = load_for_inference(str(out))
    base, _ = load_for_inference(tiny_dir)
    ids = torch.tensor([tokenizer("Say yes.")["input_ids"]])
    with torch.no_grad():
        trained, original = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert not torch.allclose(trained, original, atol=1e-6)  # training changed the model it reloads
    # every saved method generates through the same code path as SIMoE: greedy, the routed ones
    # under their prompt's routing; the reference decodes by full forwards
    from simoe.data import render_prompt
    from simoe.inference.generation import generate

    chat = [{"role": "user", "content": "Say no."}]
    seq = torch.tensor([render_prompt(tokenizer, chat)])
    routing = {"routing": model.route(seq, torch.ones_like(seq))} if method == "smear" else {}
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(input_ids=seq, **routing).logits[:, -1:].argmax(-1)], dim=1)
    reference = tokenizer.decode(seq[0, -3:], skip_special_tokens=True).strip()
    assert generate(model, tokenizer, [chat], max_new_tokens=3, min_new_tokens=3) == [reference]


@pytest.mark.parametrize("method", ["lora", "smear"])
def test_baseline_resume_equals_uninterrupted(method, tiny_dir, data, tmp_path):
    _train(tiny_dir, data, tmp_path / "full", method, steps=4)
    _train(tiny_dir, data, tmp_path / "resumed", method, steps=4,
           extra=("--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")))
    a, _ = load_for_inference(str(tmp_path / "full"))
    b, _ = load_for_inference(str(tmp_path / "resumed"))
    ids = torch.randint(3, 200, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
