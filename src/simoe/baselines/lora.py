"""LoRA baseline: PEFT adapters on every linear layer but the output layer.

The model is PEFT's own ``PeftModel``: it saves and loads in PEFT's adapter format
(``adapter_config.json`` + ``adapter_model.safetensors``), and ``merge_and_unload()`` gives a
plain model. Only the adapter matrices train; B starts at zero, so the model starts as the base.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from simoe.baselines.config import BaselineConfig
from simoe.extras import require


def build_lora(base: PreTrainedModel, options: BaselineConfig) -> nn.Module:
    """Wrap ``base`` (in place) with LoRA adapters of rank ``options.lora_rank`` on all linear layers."""
    peft = require("peft", "the lora baseline (simoe train --method lora)")
    config = peft.LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules="all-linear",  # PEFT's meaning: every Linear/Conv1D except the output layer
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(base, config)  # freezes the base, leaves the adapters trainable
