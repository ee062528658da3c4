"""Sharded training through accelerate and Trainer: FSDP2 on CPU (gloo, 2 processes), launched with the
shipped configs/accelerate/fsdp2.yaml as a GPU user launches it. accelerate does not shard on CPU by
itself; tests/fsdp2_tiny.py lifts that one gate (its docstring says where and how), and every step
below checks that the trainable tensors really were sharded, so a fallback to DDP fails.
DeepSpeed ZeRO-2/3 likewise, on DeepSpeed's CPU accelerator (tests/deepspeed_tiny.py), when deepspeed
is installed (it is not a dependency; CI skips these); benchmarks/check_distributed.py checks ZeRO-2/3
and FSDP2 on a GPU."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TESTS, WEIGHTS_FILE, run_training, same_logs, same_weights
from safetensors.torch import load_file

REPO = TESTS.parent
FSDP2_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yaml"


def _run(out: Path, launcher: list[str], **opts) -> dict[int, dict]:
    return run_training("fsdp2_tiny.py", out, launcher, **opts)


def _fsdp2(out: Path, **opts) -> dict[int, dict]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG),
              "--num_processes", "2", "--main_process_port", "29547"]
    return _run(out, launch, **opts)


def _one_process(out: Path, **opts) -> dict[int, dict]:
    return _run(out, [sys.executable], **opts)


def _sharded_steps(out: Path) -> list[list[str]]:
    """Per step, the kinds of tensor the trainable parameters were."""
    return [json.loads(line)["kinds"] for line in (out / "sharded.jsonl").read_text().splitlines()]



@pytest.mark.slow
def test_fsdp2_run_equals_one_process_saves_whole_tensors_and_resumes_exactly(tmp_path):
    from conftest import tiny_model

    from simoe import SIMoEModel

    one = _one_process(tmp_path / "one", max_steps=4, batch=4)
    two = _fsdp2(tmp_path / "two", max_steps=4, batch=2)  # 2 processes x 2 = the same global batch
    assert _sharded_steps(tmp_path / "two") == [["DTensor"]] * 4  # sharded at every step: not DDP
    assert _sharded_steps(tmp_path / "one") == [["Parameter"]] * 4
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        same_logs(one[step], two[step])
    # reduce-scatter sums in another order; Adam turns that into ~1e-6 (as in the DDP test)
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        same_weights(tmp_path / "one" / name, tmp_path / "two" / name, rtol=1e-4, atol=1e-5)

    # resume from checkpoint-2 (2 processes again): steps 3-4 as the uninterrupted run took them
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = _fsdp2(resumed_dir, max_steps=4, batch=2, resume=str(resumed_dir / "checkpoint-2"))
    assert sorted(resumed) == [3, 4] and _sharded_steps(resumed_dir) == [["DTensor"]] * 2
    for step in resumed:
        same_logs(resumed[step], two[step])
    same_weights(tmp_path / "two" / "final", resumed_dir / "final", rtol=0, atol=0)

    saved = load_file(tmp_path / "two" / "final" / WEIGHTS_FILE)
    model = SIMoEModel.from_pretrained(tiny_model("llama"), tmp_path / "two" / "final")
    routed = model.routed_state_dict()
    assert routed.keys() == saved.keys() and all(torch.equal(routed[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_fsdp2_on_a_bf16_base_keeps_and_saves_the_trainable_tensors_in_fp32(tmp_path):
    # the shipped config's setting (no mixed precision): one FSDP2 unit holds the frozen bf16 base and
    # the fp32 Δ, log α and router
    _fsdp2(tmp_path, max_steps=2, batch=2, save_steps=2, bf16_base=True)
    assert _sharded_steps(tmp_path) == [["DTensor"]] * 2
    for name in ("checkpoint-2", "final"):
        saved = load_file(tmp_path / name / WEIGHTS_FILE)
        assert {t.dtype for t in saved.values()} == {torch.float32}, name
        assert all(torch.isfinite(t).all() for t in saved.values()), name


def test_the_shipped_accelerate_config_is_fsdp2_with_one_unit_and_full_state_dicts():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(FSDP2_CONFIG))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "no"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "NO_WRAP"  # see the config: the gates need log α whole
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # Trainer hands _save a full state dict
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert set(yaml.safe_load(FSDP2_CONFIG.read_text())["fsdp_config"]) == set(fsdp)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_shipped_deepspeed_configs_leave_optimizer_and_schedule_to_the_trainer(stage):
    config = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    # SIMoETrainer's optimizer (its learning rate per tensor kind) and schedule, not DeepSpeed's
    assert "optimizer" not in config and "scheduler" not in config
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:  # Trainer gathers the partitioned tensors and hands them to SIMoETrainer._save
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def _deepspeed(out: Path, config: Path, check: bool = True, **opts) -> dict[int, dict]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", "29548"]
    return run_training("deepspeed_tiny.py", out, launch, check, deepspeed=str(config), **opts)


def _partitioned(out: Path) -> list[bool]:
    return [json.loads(line)["partitioned"] for line in (out / "partitioned.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_run_equals_one_process_and_saves_whole_fp32_tensors(tmp_path, stage):
    pytest.importorskip("deepspeed")
    from conftest import tiny_model

    from simoe import SIMoEModel

    config = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:  # the tiny model's tensors all fall under the shipped threshold: partition Δ for real
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 500
    (tmp_path / "zero.json").write_text(json.dumps(config))
    one = run_training("deepspeed_tiny.py", tmp_path / "one", max_steps=4, batch=4)
    two = _deepspeed(tmp_path / "two", tmp_path / "zero.json", max_steps=4, batch=2)
    assert _partitioned(tmp_path / "two") == [stage == 3] * 4
    for step in one:
        same_logs(one[step], two[step])
    for name in ("checkpoint-2", "checkpoint-4", "final"):  # gathered by Trainer, handed to _save
        same_weights(tmp_path / "one" / name, tmp_path / "two" / name, rtol=1e-4, atol=1e-5)
        saved = load_file(tmp_path / "two" / name / WEIGHTS_FILE)
        assert {t.dtype for t in saved.values()} == {torch.float32}, name
    model = SIMoEModel.from_pretrained(tiny_model("llama"), tmp_path / "two" / "final")
    saved = load_file(tmp_path / "two" / "final" / WEIGHTS_FILE)
    assert all(torch.equal(model.routed_state_dict()[k], saved[k]) for k in saved)

    # resume from checkpoint-2 (DeepSpeed's own checkpoint): steps 3-4 as the uninterrupted run took them
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = _deepspeed(resumed_dir, tmp_path / "zero.json", max_steps=4, batch=2,
                         resume=str(resumed_dir / "checkpoint-2"))
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        same_logs(resumed[step], two[step])
    same_weights(tmp_path / "two" / "final", resumed_dir / "final", rtol=0, atol=0)


@pytest.mark.slow
def test_deepspeed_zero3_refuses_upcycled_norms_with_a_clear_error(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(AssertionError, match="upcycle_norms false"):
        _deepspeed(tmp_path, REPO / "configs" / "deepspeed" / "zero3.json", max_steps=1, batch=2, norms=True)


@pytest.mark.slow
def test_deepspeed_zero3_refuses_to_partition_the_mask_logits(tmp_path):
    pytest.importorskip("deepspeed")
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 10  # below every log α
    (tmp_path / "zero.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="raise zero_optimization.stage3_param_persistence_threshold"):
        _deepspeed(tmp_path, tmp_path / "zero.json", max_steps=1, batch=2)
