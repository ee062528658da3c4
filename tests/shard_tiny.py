"""Shard a tiny SIMoE Llama with FSDP2 (fully_shard, gloo on CPU) and save it, its sharded tensors
gathered; read it whole inside ``unsharded``; load a saved checkpoint into the sharded model; run
under torchrun by tests/core/test_sharded_save.py.

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
from simoe.routed_model import unsharded


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
    def layer_tensors():  # the routed layers' Δ and log α, as the trainer's metrics read them
        return {f"{name}.{kind}": getattr(layer, kind) for name, layer in model.routed_layers()
                for kind in ("delta", "log_alpha")}

    with unsharded(model):  # whole inside
        assert not any(isinstance(v, DTensor) for v in layer_tensors().values())
        if rank == 0:
            save_state({k: v.detach().clone() for k, v in layer_tensors().items()},
                       os.path.join(out, "unsharded.safetensors"))
            save_state({"union": torch.tensor(model.sparsity_report()["union"]["deterministic_density"])},
                       os.path.join(out, "report.safetensors"))
    assert all(isinstance(v, DTensor) for v in layer_tensors().values())  # sharded again
    with torch.no_grad():  # a resume: the saved whole tensors go into the shards again
        for value in model.routed_state_dict().values():
            value.zero_()
    model.load_routed_weights(os.path.join(out, "gathered"))
    model.save_pretrained(os.path.join(out, "reloaded"), is_main_process=rank == 0)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
