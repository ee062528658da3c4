"""Saving a sharded model: FSDP2's DTensors are gathered into whole tensors (2 processes, gloo on
CPU), read whole inside ``unsharded`` and loaded back into the shards; a full state dict handed over
by a trainer (as Trainer does under FSDP / DeepSpeed) is where the routed tensors are taken from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_experts, tiny_model
from safetensors.torch import load_file

from simoe import SIMoEConfig, SIMoEModel, upcycle
from simoe.config import WEIGHTS_NAME

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_fsdp2_sharded_model_saves_reads_and_loads_whole_tensors(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
           str(TESTS / "shard_tiny.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = load_file(tmp_path / "reference.safetensors")
    for saved in (load_file(tmp_path / "gathered" / WEIGHTS_NAME),  # saved, gathered
                  load_file(tmp_path / "reloaded" / WEIGHTS_NAME)):  # loaded into the shards, saved again
        assert saved.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(saved[key], tensor), key
    whole = load_file(tmp_path / "unsharded.safetensors")  # the layers' tensors read inside unsharded()
    assert whole and all(torch.equal(tensor, reference[key]) for key, tensor in whole.items())
    loaded = SIMoEModel.from_pretrained(tiny_model("llama"), tmp_path / "gathered")
    assert all(torch.equal(loaded.routed_state_dict()[k], reference[k]) for k in reference)
    union = loaded.sparsity_report()["union"]["deterministic_density"]
    assert load_file(tmp_path / "report.safetensors")["union"].item() == pytest.approx(union)


def test_routed_tensors_are_taken_from_a_full_state_dict_when_one_is_given(tmp_path):
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=3))
    randomize_experts(model)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    marked = next(k for k in full if k.endswith(".delta"))
    full[marked] = full[marked] + 1.0  # what the trainer gathered differs from the live tensor
    model.save_pretrained(tmp_path, state_dict=full)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    routed = model.routed_state_dict()
    assert saved.keys() == routed.keys()
    for key in routed:
        expected = full[key if key.startswith("router.") else f"base_model.{key}"]
        assert torch.equal(saved[key], expected), key
    model.save_pretrained(tmp_path / "other", is_main_process=False)  # a non-main rank writes nothing
    assert not (tmp_path / "other").exists()
