"""Shard a tiny SIMoE Llama with FSDP2 (fully_shard, gloo on CPU) and save it, its sharded tensors
gathered; run under torchrun by tests/core/test_sharded_save.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/shard_tiny.py OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist
from conftest import randomize_experts, tiny_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from simoe import SIMoEConfig, upcycle
from simoe.io import save_state


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=3))
    randomize_experts(model)
    if rank == 0:  # the unsharded truth
        save_state({k: v.detach().clone() for k, v in model.routed_state_dict().items()},
                   os.path.join(out, "reference.safetensors"))
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert any(isinstance(v, DTensor) for v in model.routed_state_dict().values()), "nothing was sharded"
    model.save_pretrained(os.path.join(out, "gathered"), is_main_process=rank == 0)  # all gather
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
