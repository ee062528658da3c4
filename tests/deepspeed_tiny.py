"""Train a tiny SIMoE Llama with SIMoETrainer under DeepSpeed ZeRO on CPU (DeepSpeed's CPU accelerator,
gloo); run by tests/training/test_sharded_training.py, which skips when deepspeed is not installed:

    torchrun --nproc_per_node 2 tests/deepspeed_tiny.py OUT_DIR '{"max_steps": 4, "batch": 2,
        "deepspeed": "zero3.json"}'

and, without "deepspeed", as a plain script: the unsharded one-process reference. The norms are not
upcycled (``upcycle_norms`` false): under ZeRO-3 SIMoETrainer refuses them (see its check).

accelerate turns DeepSpeed on only off the CPU (accelerate/state.py, ``AcceleratorState.__init__``:
the ``ACCELERATE_USE_DEEPSPEED ... and not cpu`` branch); :func:`allow_deepspeed_on_cpu` takes that
branch's steps for a CPU run and nothing else: the engine, ZeRO's partitioning, Trainer's gathered
save and its resume are DeepSpeed's and Trainer's own. OUT_DIR/partitioned.jsonl records at every
step whether some trainable tensor was really split across the ranks.
"""

import json
import os
import sys

import torch
from conftest import tiny_model, train_without_dropout
from train_tiny import train
from transformers import TrainerCallback

from simoe import SIMoEConfig, upcycle


def allow_deepspeed_on_cpu() -> None:
    """Let ``AcceleratorState`` select the DeepSpeed plugin on CPU (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def keep_deepspeed(self, *args, deepspeed_plugin=None, **kwargs):
        init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if deepspeed_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            import deepspeed

            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            # PartialState too: every later AcceleratorState() copies its distributed_type
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    AcceleratorState.__init__ = keep_deepspeed


class RecordPartitioning(TrainerCallback):
    """OUT_DIR/partitioned.jsonl: per step, whether a trainable tensor was held in parts."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            split = any(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()
                        if p.requires_grad and hasattr(p, "ds_tensor"))
            with open(os.path.join(args.output_dir, "partitioned.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, "partitioned": split}) + "\n")


def main() -> None:
    out, opts = sys.argv[1], json.loads(sys.argv[2])
    if opts.get("deepspeed"):
        allow_deepspeed_on_cpu()
    torch.manual_seed(0)
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4, target_sparsity=0.5,
                                                     upcycle_norms=opts.get("norms", False)))
    train_without_dropout(model)
    train(out, {"save_steps": 2, **opts}, model, RecordPartitioning(), deepspeed=opts.get("deepspeed"))


if __name__ == "__main__":
    main()
