"""benchmarks/check_distributed.py checks DeepSpeed and FSDP2 on GPUs, which this machine lacks: here
its options parse, it says plainly that it cannot run (no traceback), and its one-process run and its
checks work on CPU."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "check_distributed.py"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _script():
    spec = importlib.util.spec_from_file_location("check_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_cases_and_the_exit_statuses():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "{zero2,zero3,fsdp2}" in proc.stdout and "Exit status" in proc.stdout


def test_without_a_gpu_it_says_so_and_checks_nothing():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cases", "zero3"], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "nothing checked: no CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_its_unsharded_run_and_its_checks_work_on_cpu(tmp_path):
    ref = tmp_path / "reference"
    subprocess.run([sys.executable, str(SCRIPT), "--worker", "reference", "--output_dir", str(ref),
                    "--batch", "4", "--steps", "2"], capture_output=True, text=True, env=ENV, timeout=300,
                   check=True)
    check = _script()
    assert check.check_saved(ref, ref, steps=2, rtol=0, atol=0) == []
    assert check.check_loads(ref) == []
    # an unsharded run is no sharded case
    assert check.check_sharding("zero2", ref) == ["distributed_type was 'NO', not 'DEEPSPEED'",
                                                  "zero_stage was None, not 2"]
    assert check.check_sharding("fsdp2", ref) == ["distributed_type was 'NO', not 'FSDP'",
                                                  "kinds was ['Parameter'], not ['DTensor']"]

    bad = tmp_path / "bad"  # a shard instead of a whole tensor, a bf16 copy, a changed value
    shutil.copytree(ref, bad)
    tensors = load_file(bad / "final" / check.WEIGHTS)
    keys = sorted(k for k in tensors if k.endswith(".delta"))
    tensors[keys[0]] = tensors[keys[0]][: tensors[keys[0]].shape[0] // 2].contiguous()
    tensors[keys[1]] = tensors[keys[1]].to(torch.bfloat16)
    tensors[keys[2]] = tensors[keys[2]] + 1.0
    save_file(tensors, bad / "final" / check.WEIGHTS)
    problems = check.check_saved(bad, ref, steps=2, rtol=1e-3, atol=1e-4)
    assert [p.split(" ")[1] for p in problems[:2]] == [keys[0], keys[1]]
    assert "(a shard?)" in problems[0] and "saved as torch.bfloat16" in problems[1]
    assert problems[2].startswith("final: differs from the unsharded run by up to 1.00e+00")
    assert check.check_loads(bad)[0].startswith("SIMoEModel.from_pretrained failed")
