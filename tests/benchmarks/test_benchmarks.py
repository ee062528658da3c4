"""The benchmarks keep running (``--quick``: CPU, tiny shapes). Only that they run and print their
tables is checked here: timings are the benchmarks' business, never a test's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script, headers", [
    ("bench_decode.py", ["| base |", "| SIMoE, one routing (folded) |", "| SIMoE, per-prompt routings |"]),
    ("bench_scale.py", ["| full FT |", "| LoRA r=16 |", "| SIMoE M=8, fresh masks |",
                        "| SIMoE M=8, 25% dense |", "| SIMoE M=8, 25% dense, compacted |",
                        "| SIMoE 25%, one routing (folded) |"]),
])
def test_benchmark_runs_quick_and_prints_its_tables(script, headers):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True,
                         text=True, env=env, timeout=600, check=True).stdout
    for header in headers:
        assert header in out, (header, out)
