"""Sparse upcycling (Komatsuzaki et al., 2023): every dense FFN becomes E copies behind a new top-k router.

The result is an ordinary transformers MoE model, built from transformers' own classes rather than a
hand-written MoE: Llama and Mistral become ``MixtralForCausalLM``, Qwen2 becomes ``Qwen2MoeForCausalLM``.
It saves with ``save_pretrained``, loads with ``AutoModelForCausalLM`` and generates as any HF model.

Every weight is copied; each layer's ``mlp.gate_proj``/``up_proj``/``down_proj`` goes into all E
experts (transformers 5 stores them stacked: ``experts.gate_up_proj`` [E, 2I, H] with the gate rows
first, ``experts.down_proj`` [E, H, I]). The routers are new, initialised by the MoE class itself
(normal, std = ``initializer_range``). Right after upcycling the model computes the dense model: the
top-k weights are renormalised to sum to 1 and all experts are equal, so Σ_k w_k FFN(x) = FFN(x).

Qwen2-MoE adds a shared expert, scaled by a sigmoid gate, to the routed ones. Sparse upcycling has
none, and a sigmoid gate can never switch a non-zero expert fully off, so we give the shared expert
an intermediate size of 0: it has no weights and adds exactly 0, and the model is Komatsuzaki's plain
top-k MoE (its 1 x H sigmoid gate remains, multiplying an empty expert). ``norm_topk_prob=True``
renormalises the top-k weights as Mixtral does.

The load-balancing loss (Switch Transformer) is the classes' own: a forward with
``output_router_logits=True`` adds ``router_aux_loss_coef`` x it to ``loss``. We request it for every
forward in train mode (:func:`train_with_aux_loss`) instead of setting it in the config: with the config
flag on, transformers' cached generation with an attention mask fails (the loss pairs the router logits
of the new token with the whole mask; transformers issue #30731). The saved model therefore generates
with any tool, and evaluation losses are the plain NLL, comparable across methods.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
)

from simoe.baselines.config import BaselineConfig

# Dense model_type -> the transformers MoE config class it upcycles into.
SUPPORTED = {"llama": MixtralConfig, "mistral": MixtralConfig, "qwen2": Qwen2MoeConfig}

# Fields the dense and MoE configs share (copied when the dense config has them).
_SHARED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id",
    "bos_token_id", "eos_token_id",
)
_QWEN2_ATTENTION = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def moe_config(dense: PretrainedConfig, options: BaselineConfig) -> PretrainedConfig:
    """The MoE config whose model, with equal experts, computes the dense model ``dense``."""
    model_type = dense.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"sparse upcycling supports model types {sorted(SUPPORTED)} "
                         f"(into Mixtral / Qwen2-MoE), got {model_type!r}")
    for flag in ("attention_bias", "mlp_bias"):  # Llama options the Mixtral classes do not have
        if getattr(dense, flag, False):
            raise ValueError(f"sparse upcycling: {model_type} with {flag}=True has no Mixtral equivalent")
    kwargs = {name: getattr(dense, name) for name in _SHARED if hasattr(dense, name)}
    kwargs.update(num_experts_per_tok=options.top_k, router_aux_loss_coef=options.router_aux_loss_coef)
    if SUPPORTED[model_type] is MixtralConfig:
        return MixtralConfig(
            **kwargs, intermediate_size=dense.intermediate_size, num_local_experts=options.num_ffn_experts,
            sliding_window=getattr(dense, "sliding_window", None),
            router_jitter_noise=options.router_jitter_noise,
        )
    if options.router_jitter_noise:
        raise ValueError("router_jitter_noise: Qwen2-MoE's router has no jitter noise; set it to 0")
    kwargs.update({name: getattr(dense, name) for name in _QWEN2_ATTENTION if hasattr(dense, name)})
    return Qwen2MoeConfig(
        **kwargs, intermediate_size=dense.intermediate_size, moe_intermediate_size=dense.intermediate_size,
        num_experts=options.num_ffn_experts, norm_topk_prob=True, shared_expert_intermediate_size=0,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
    )


def _request_router_logits(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if module.training and kwargs.get("output_router_logits") is None:
        kwargs["output_router_logits"] = True
    return args, kwargs


def train_with_aux_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Make every train-mode forward of an MoE model add the load-balancing loss to ``loss``.

    :func:`sparse_upcycle` does it; call it on a model loaded from disk to train it further.
    """
    if not hasattr(model.config, "router_aux_loss_coef"):
        raise ValueError(f"{type(model).__name__} has no load-balancing loss (router_aux_loss_coef)")
    model.register_forward_pre_hook(_request_router_logits, with_kwargs=True)
    return model


def sparse_upcycle(base: PreTrainedModel, options: BaselineConfig) -> PreTrainedModel:
    """A new MoE model (Mixtral / Qwen2-MoE) holding ``base``'s weights with E copies of every FFN.

    ``base`` is left as it is. Dtype, device and attention implementation follow it. Trainable:
    everything (``upcycling_trainable="all"``) or only the experts and routers (``"moe"``).
    """
    config = moe_config(base.config, options)
    config.name_or_path = base.name_or_path
    with warnings.catch_warnings(), torch.device(base.device):
        # Qwen2-MoE's empty shared expert makes torch warn that initialising it is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        moe = AutoModelForCausalLM.from_config(
            config, dtype=base.dtype, attn_implementation=base.config._attn_implementation
        )
    dense = base.state_dict()
    ffn = {key: dense.pop(key) for key in [k for k in dense if ".mlp." in k]}
    missing, unexpected = moe.load_state_dict(dense, strict=False)
    not_copied = [k for k in missing if ".mlp." not in k]  # the MoE blocks are filled below
    if not_copied or unexpected:
        raise RuntimeError(f"sparse upcycling of {type(base).__name__}: weights missing {not_copied[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with torch.no_grad():  # copy_ broadcasts the dense FFN into all E experts without E temporary copies
        for i, layer in enumerate(moe.model.layers):
            prefix = f"model.layers.{i}.mlp."
            gate_up = torch.cat([ffn.pop(prefix + "gate_proj.weight"), ffn.pop(prefix + "up_proj.weight")])
            layer.mlp.experts.gate_up_proj.copy_(gate_up)  # gate rows first: the experts chunk(2) them
            layer.mlp.experts.down_proj.copy_(ffn.pop(prefix + "down_proj.weight"))
    if ffn:
        raise ValueError(f"sparse upcycling: unexpected FFN tensors {sorted(ffn)[:5]} "
                         "(only gate/up/down weights)")
    moe.generation_config = copy.deepcopy(base.generation_config)
    train_with_aux_loss(moe)
    moe.train(base.training)
    moe.requires_grad_(options.upcycling_trainable == "all")
    if options.upcycling_trainable == "moe":
        for layer in moe.model.layers:
            layer.mlp.requires_grad_(True)
    return moe
