"""Every shipped config trains for 2 steps through `simoe train`, with a tiny model standing in."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CHAT_RECORDS, SHARED_DATA
from transformers import AutoModelForCausalLM

from simoe import SIMoEModel
from simoe.cli import main
from simoe.training.arguments import parse_train_args

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml")
                 if not p.name.startswith("compare_"))  # `simoe compare` studies: test_compare.py


def _data_for(config: dict, tmp_path: Path) -> list[str]:
    if config["data"] == "natural-instructions":
        return ["--data", str(SHARED_DATA / "sni"), "--max_instances_per_task", "2"]
    if config["data"].startswith("allenai/"):
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS))
        return ["--data", str(path)]
    return []


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_two_steps(config_path, tiny_dir, tmp_path):
    import yaml

    config = yaml.safe_load(config_path.read_text())
    out = tmp_path / "out"
    argv = ["--config", str(config_path), "--model_name_or_path", tiny_dir, "--max_steps", "2",
            "--output_dir", str(out), "--max_seq_length", "128", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--bf16", "false", "--target_modules", "all-linear", "--dtype", "float32",
            *_data_for(config, tmp_path)]
    _, _, simoe_config, args = parse_train_args(argv)
    # the config's method settings arrive as written, and so do its training settings
    assert simoe_config.num_experts == config["num_experts"]
    assert simoe_config.target_sparsity == config["target_sparsity"]
    assert args.learning_rate == config["learning_rate"]
    assert args.mask_learning_rate == config["mask_learning_rate"]
    assert args.gradient_checkpointing == config.get("gradient_checkpointing", False)
    main(["train", *argv])

    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logs = [h for h in state["log_history"] if "nll" in h]
    assert len(logs) == 2 and all(0 < h["nll"] < 20 for h in logs)
    card = (out / "README.md").read_text()  # the model card says what it was trained on
    assert "## Training" in card and "2 optimizer steps" in card and "E0 " in card
    saved = json.loads((out / "simoe_config.json").read_text())
    assert saved["base_model_name_or_path"] == tiny_dir and saved["num_experts"] == config["num_experts"]
    # path-only reload: the recorded base plus the trained SIMoE tensors
    model = SIMoEModel.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 200, (1, 12))
    reference = SIMoEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("delta"))


def test_unknown_yaml_option_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_experts: 4\nnum_expert: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*num_expert"):
        parse_train_args(["--config", str(bad)])


def test_command_line_overrides_the_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_experts: 4\nlearning_rate: 0.5\ntarget_modules: [q_proj, v_proj]\n")
    _, _, config, args = parse_train_args(["--config", str(cfg), "--num_experts", "6"])
    assert config.num_experts == 6 and args.learning_rate == 0.5
    assert config.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("method, argv, named", [
    ("simoe", ["--lora_rank", "8"], r"--lora_rank \(applies to lora\)"),
    ("lora", ["--num_experts", "4", "--mask_learning_rate", "0.1"],
     r"--mask_learning_rate \(applies to simoe\); --num_experts \(applies to simoe\)"),
    ("full", ["--num_ffn_experts=2"], r"--num_ffn_experts \(applies to sparse-upcycling, smear\)"),
    ("smear", ["--top_k", "1"], r"--top_k \(applies to sparse-upcycling\)"),
])
def test_an_option_the_method_ignores_is_an_error_naming_it(method, argv, named):
    with pytest.raises(ValueError, match=rf"command line: .*--method {method}: {named}"):
        parse_train_args(["--method", method, *argv])


def test_a_yaml_option_the_method_ignores_names_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lora\nlora_rank: 8\nnum_experts: 4\n")
    with pytest.raises(ValueError, match=r"c\.yaml: .*--method lora: num_experts \(applies to simoe\)$"):
        parse_train_args(["--config", str(cfg)])
    # the options each method does take are accepted, from the file and the command line
    cfg.write_text("method: lora\nlora_rank: 8\n")
    _, _, config, _ = parse_train_args(["--config", str(cfg)])
    assert config.lora_rank == 8
    _, _, config, args = parse_train_args(["--method", "smear", "--router_learning_rate", "1e-3",
                                           "--num_ffn_experts", "2", "--learning_rate", "1e-4"])
    assert config.num_ffn_experts == 2 and args.router_learning_rate == 1e-3


def test_target_modules_are_normalised_once_in_the_config(tmp_path):
    from simoe import SIMoEConfig

    assert SIMoEConfig(target_modules=[r".*layers\.1\..*"]).target_modules == r".*layers\.1\..*"
    assert SIMoEConfig(target_modules=["all-linear"]).target_modules == "all-linear"
    assert SIMoEConfig(target_modules=["q_proj"]).target_modules == ["q_proj"]
    assert SIMoEConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]
    # the same from the command line (a list of tokens) and from YAML (a string or a list)
    assert parse_train_args(["--target_modules", ".*mlp.*"])[2].target_modules == ".*mlp.*"
    both = parse_train_args(["--target_modules", "q_proj", "v_proj"])[2].target_modules
    assert both == ["q_proj", "v_proj"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_modules: '.*mlp.*'\n")
    assert parse_train_args(["--config", str(cfg)])[2].target_modules == ".*mlp.*"
    cfg.write_text("target_modules: [o_proj]\n")
    assert parse_train_args(["--config", str(cfg)])[2].target_modules == ["o_proj"]
