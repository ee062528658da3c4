"""simoe.training.zero3: what SIMoE needs under DeepSpeed ZeRO-3 (runs where deepspeed is installed;
the training runs that use it are in test_sharded_training.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from simoe.training.arguments import SIMoETrainingArguments
from simoe.training.zero3 import whole_base

args = SIMoETrainingArguments(output_dir=sys.argv[1], deepspeed=json.load(open(sys.argv[2])), use_cpu=True,
                              report_to="none")
with whole_base(args):
    inside = AutoModelForCausalLM.from_pretrained(sys.argv[3])
    enabled_inside = is_deepspeed_zero3_enabled()
outside = AutoModelForCausalLM.from_pretrained(sys.argv[3])
partitioned = {name: any(hasattr(p, "ds_id") for p in model.parameters())
               for name, model in (("inside", inside), ("outside", outside))}
enabled = {"enabled_inside": enabled_inside, "enabled_after": is_deepspeed_zero3_enabled()}
print(json.dumps({**partitioned, **enabled}))
"""


@pytest.mark.slow
def test_whole_base_builds_the_base_outside_zero_init_and_restores_the_config(tmp_path):
    """With ZeRO-3 training arguments transformers partitions every model it builds (zero.Init); the
    base that simoe train upcycles is built whole, and the ZeRO-3 config is back afterwards."""
    pytest.importorskip("deepspeed")
    tiny_model("llama").save_pretrained(tmp_path / "base")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29549", "OMP_NUM_THREADS": "1"}
    config = os.path.join(REPO, "configs", "deepspeed", "zero3.json")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), config, str(tmp_path / "base")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts == {"inside": False, "enabled_inside": False, "outside": True, "enabled_after": True}

