"""What SIMoE needs under DeepSpeed ZeRO-3, which partitions every parameter across the ranks and
gathers a module's own parameters only around that module's forward and backward.

* The routing reads every layer's log α before the layers run (``SIMoEModel.set_routing``), so log α
  must be whole then: :class:`PrepareZero3` registers them as parameters the model's own forward
  uses. The trainer's metrics read them between steps, so DeepSpeed must keep them whole
  (``stage3_param_persistence_threshold`` above their size): :func:`check_zero3` refuses a run
  in which some log α is larger.
* A SIMoE norm runs its base with a per-example weight in place of the hooked parameter, which
  ZeRO-3's hooks cannot follow: :func:`check_zero3` refuses upcycled norms.
* transformers builds a model inside DeepSpeed's ``zero.Init`` once training arguments with a ZeRO-3
  config exist, partitioned as it is built; the base must be whole to be upcycled, so ``simoe
  train`` loads it inside :func:`whole_base` (DeepSpeed partitions the upcycled model when the
  trainer wraps it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import TrainerCallback

from simoe.layer import SIMoENorm
from simoe.model import SIMoEModel


def check_zero3(model: SIMoEModel) -> None:
    """Refuse, with what to change, a model that ZeRO-3 cannot train (its parameters converted)."""
    layers = [layer for _, layer in model.routed_layers()]
    if any(isinstance(layer, SIMoENorm) for layer in layers):
        raise ValueError("DeepSpeed ZeRO-3 cannot train upcycled norms: ZeRO-3 hooks every module and "
                         "a SIMoE norm runs its base with a per-example weight in place of the partitioned "
                         "one; pass --upcycle_norms false (or use ZeRO-2 or FSDP2)")
    largest = max((layer.log_alpha for layer in layers), key=lambda p: getattr(p, "ds_numel", 0))
    if not getattr(largest, "ds_persist", True):
        raise ValueError(f"DeepSpeed ZeRO-3 partitions log α ({largest.ds_numel} entries in the largest "
                         "layer), which the trainer's metrics read between steps: raise "
                         f"zero_optimization.stage3_param_persistence_threshold above {largest.ds_numel}")


class PrepareZero3(TrainerCallback):
    """Once DeepSpeed has converted the model, before the first step: :func:`check_zero3`, and every
    log α registered as an external parameter of the model itself, whose forward reads them in the
    routing: ZeRO-3 then has them whole (not partitioned, not still in flight) when it begins."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_zero3(model)
        import deepspeed

        for _, layer in model.routed_layers():
            deepspeed.zero.register_external_parameter(model, layer.log_alpha)


@contextlib.contextmanager
def whole_base(training_args) -> Iterator[None]:
    """Models built inside this context are whole, even with a ZeRO-3 config in ``training_args``."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)
