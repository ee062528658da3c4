"""Train a tiny SIMoE Llama with SIMoETrainer, sharded by FSDP2 through accelerate on CPU (gloo); run by
tests/training/test_sharded_training.py with the shipped accelerate config:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
        tests/fsdp2_tiny.py OUT_DIR '{"max_steps": 4, "batch": 2}'

and, for the unsharded reference, as a plain script (``python tests/fsdp2_tiny.py OUT_DIR '{...}'``).

accelerate shards only on accelerator devices: ``AcceleratorState`` keeps the FSDP plugin for the
device types it lists (accelerate/state.py, the ``elif self.distributed_type in [MULTI_GPU, ...]``
branch of ``AcceleratorState.__init__``, which leaves out MULTI_CPU), so on CPU the same launch
silently trains with DDP. :func:`allow_fsdp_on_cpu` lifts that one gate and nothing else: the plugin
built from the config, ``fully_shard``, Trainer's FSDP saves (full state dict, optimizer state) and
its resume are accelerate's and Trainer's own. OUT_DIR/sharded.jsonl records at every step which
kinds of tensor the trainable parameters were, so a run that fell back to DDP is caught.
"""

import json
import os
import sys

import torch
from conftest import tiny_model, train_without_dropout
from train_tiny import train
from transformers import TrainerCallback

from simoe import SIMoEConfig, upcycle


def allow_fsdp_on_cpu() -> None:
    """Let ``AcceleratorState`` keep an FSDP plugin on CPU (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def keep_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            # PartialState too: every later AcceleratorState() copies its distributed_type
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = keep_fsdp


class RecordSharding(TrainerCallback):
    """OUT_DIR/sharded.jsonl: per step, the types of the trainable parameters (DTensor when sharded)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            kinds = sorted({type(p).__name__ for p in model.parameters() if p.requires_grad})
            with open(os.path.join(args.output_dir, "sharded.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, "kinds": kinds}) + "\n")


def main() -> None:
    out, opts = sys.argv[1], json.loads(sys.argv[2])
    allow_fsdp_on_cpu()
    torch.manual_seed(0)
    base = tiny_model("llama")
    if opts.get("bf16_base"):  # the frozen base in bf16, Δ, log α and the router in fp32
        base = base.to(torch.bfloat16)
    model = upcycle(base, SIMoEConfig(num_experts=4, target_sparsity=0.5))
    train_without_dropout(model)
    train(out, {"save_steps": 2, **opts}, model, RecordSharding())


if __name__ == "__main__":
    main()
