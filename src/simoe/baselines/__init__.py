"""The baselines of the side-by-side study, built from the same base as SIMoE.

* ``full``: full fine-tuning (the base, every parameter trainable).
* ``lora``: PEFT LoRA on all linear layers (:mod:`simoe.baselines.lora`).
* ``sparse-upcycling``: a top-k MoE of FFN copies as transformers' Mixtral / Qwen2-MoE
  (:mod:`simoe.baselines.sparse_upcycling`).
* ``smear``: soft merging of dense FFN experts per example, routed by SIMoE's prompt router
  (:mod:`simoe.baselines.smear`).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from simoe.baselines.config import BaselineConfig
from simoe.baselines.lora import build_lora
from simoe.baselines.smear import SMEARMLP, SMEARModel
from simoe.baselines.sparse_upcycling import sparse_upcycle
from simoe.config import SIMoEConfig
from simoe.model import SIMoEModel, upcycle

METHODS = ("simoe", "full", "lora", "sparse-upcycling", "smear")

__all__ = [
    "METHODS", "BaselineConfig", "SMEARMLP", "SMEARModel", "build", "parameter_counts", "sparse_upcycle",
]


def build(
    method: str, base: PreTrainedModel, options: BaselineConfig | SIMoEConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> nn.Module:
    """The trainable model of ``method`` built from ``base``, with ``requires_grad`` set.

    ``options``: a :class:`SIMoEConfig` for ``"simoe"``, a :class:`BaselineConfig` for the others
    (None: the defaults). ``sparse-upcycling`` returns a new model and leaves ``base`` as it is; the
    other methods modify ``base`` in place. SIMoE records the ``tokenizer``'s chat-template text
    around the user turn (see :func:`simoe.model.upcycle`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    expected = SIMoEConfig if method == "simoe" else BaselineConfig
    if options is None:
        options = expected()
    elif not isinstance(options, expected):
        raise ValueError(f"method {method!r} takes a {expected.__name__}, got {type(options).__name__}")
    if method == "simoe":
        return upcycle(base, options, tokenizer)
    if method == "full":
        return base.requires_grad_(True)
    if method == "lora":
        return build_lora(base, options)
    if method == "sparse-upcycling":
        return sparse_upcycle(base, options)
    return SMEARModel(base, options)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable, total and inference-active parameters per token of a model built by :func:`build`.

    Tied tensors count once. ``active_per_token`` is ``total`` less what one token's forward never
    touches: the E - k unselected experts of every MoE layer (sparse upcycling); E - 1 experts' worth
    of every SMEAR layer (a token runs one merged FFN); for SIMoE the Δ entries gated off in every
    expert and the mask logits, i.e. exactly the compact export's ``total_inference_params`` (base,
    Δ on the kept columns, their M gate values each, router). Embedding
    matrices count in full, as the usual "active parameters" of MoE models do. A LoRA model counts
    unmerged (its merged model has the base's count).
    """
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if isinstance(model, SIMoEModel):
        from simoe.parameters import parameter_report

        return {"trainable": trainable, "total": total,
                "active_per_token": parameter_report(model)["total_inference_params"]}
    inactive = 0
    for module in model.modules():
        if isinstance(module, (MixtralExperts, Qwen2MoeExperts)):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            inactive += (module.num_experts - model.config.num_experts_per_tok) * per_expert
        elif isinstance(module, SMEARMLP):
            per_expert = (module.gate_up.numel() + module.down.numel()) // module.num_experts
            inactive += (module.num_experts - 1) * per_expert
    return {"trainable": trainable, "total": total, "active_per_token": total - inactive}
