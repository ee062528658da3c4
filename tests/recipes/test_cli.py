import dataclasses
import json

import pytest
from conftest import tiny_model

from simoe import SIMoEConfig
from simoe.cli import COMMANDS, build_parser, main
from simoe.config import RECORDED_FIELDS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return str(path)


def test_inspect_reports_targets_and_trainable_params(model_dir, capsys):
    main(["inspect", model_dir, "--num_experts", "2", "--target_modules", "q_proj", "v_proj",
          "--upcycle_norms", "false"])
    report = json.loads(capsys.readouterr().out)
    assert report["upcycled_modules_by_name"] == {"q_proj": 2, "v_proj": 2}
    assert report["config"]["num_experts"] == 2
    # Δ has the base shapes: q is 32x32, v is 16x32 (2 kv heads of 8), in 2 layers
    assert report["trainable_params"]["delta"] == 2 * (32 * 32 + 16 * 32)
    assert report["trainable_params"]["mask_logits"] == 2 * 2 * (32 + 32)
    assert report["sparsity"]["upcycled_params"] == report["trainable_params"]["delta"]


def test_inspect_regex_target(model_dir, capsys):
    main(["inspect", model_dir, "--target_modules", r".*\.mlp\..*", "--upcycle_norms", "false"])
    report = json.loads(capsys.readouterr().out)
    assert report["upcycled_modules_by_name"] == {"down_proj": 2, "gate_proj": 2, "up_proj": 2}


def test_inspect_bad_input_is_a_clear_error(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", model_dir, "--target_modules", "qq_proj"])
    assert e.value.code == 2
    assert "['qq_proj'] match no Linear" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", model_dir, "--target_sparsity", "1.2"])
    assert "target_sparsity must be in [0, 1)" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(SIMoEConfig):
        if f.name not in RECORDED_FIELDS:  # recorded from the model and tokenizer, not options
            assert f"--{f.name}" in text
    for name in RECORDED_FIELDS:
        assert f"--{name}" not in text


def test_train_help_documents_every_option(capsys):
    from simoe.baselines import BaselineConfig
    from simoe.training.arguments import DataArguments, ModelArguments, SIMoETrainingArguments

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for cls in (ModelArguments, DataArguments, SIMoETrainingArguments, SIMoEConfig, BaselineConfig):
        for f in dataclasses.fields(cls):
            if f.name not in RECORDED_FIELDS and f.init and not f.name.startswith("_"):
                assert f"--{f.name}" in text, (cls.__name__, f.name)


@pytest.mark.parametrize("command", [[], *[name.split() for name in COMMANDS]])
def test_every_command_in_the_table_has_working_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: ")
    if command and command != ["train"]:
        job, _ = COMMANDS[" ".join(command)]
        assert job.__doc__.split()[0] in shown  # the function the table names is the one described


def test_the_table_routes_each_command_to_its_function():
    parser = build_parser()
    args = parser.parse_args(["eval", "sni", "--model", "m", "--data", "d", "--output_dir", "o"])
    assert args.job is COMMANDS["eval sni"][0] and args.name == "eval sni"
    args = parser.parse_args(["compare", "--config", "c.yaml"])
    assert args.job is COMMANDS["compare"][0]
