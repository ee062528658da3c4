"""SMEAR (Muqeeth et al., 2023): soft merging of E dense FFN experts, one merged FFN per example.

Every decoder layer's FFN (Llama-style ``gate_proj``/``up_proj``/``down_proj``) becomes a
:class:`SMEARMLP` with E trainable copies of its weights, stacked: ``gate_up`` [E, 2I, H] (gate rows
first) and ``down`` [E, H, I]. For the routing r_b of example b the layer runs one FFN with
the merged weights W_b = Σ_e r_be W_e, computed for the whole batch with one einsum and batched matmuls.

Our choices where the comparison with SIMoE needs them (see also ``BaselineConfig``):

* Routing is SIMoE's: one :class:`simoe.router.Router` per model reads the mean input embedding of the
  *prompt* tokens and gives r ∈ simplex(E), computed once per sequence and used by every layer and
  every position, in training and generation. SMEAR proper routes each layer on that layer's input
  averaged over the sequence; sharing SIMoE's prompt router makes the two methods differ only in what
  an expert is (a dense FFN copy here, a sparse mask over Δ there).
* Experts start as exact copies of the dense FFN, as upcycling does, so the model starts as the dense
  one. The router's random init gives examples different r, hence different expert gradients
  (∂L/∂W_e = Σ_b r_be ∂L/∂W_b), which breaks the symmetry after the first step (the router's own
  gradient is 0 while all experts are equal). ``smear_init_noise`` optionally perturbs the copies.
* Trainable: the expert copies and the router; attention, norms and embeddings stay frozen, as SIMoE's
  base does. The experts are kept in fp32 (as SIMoE's trainable tensors) and cast to the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from simoe.baselines.config import BaselineConfig
from simoe.routed_model import PromptRoutedModel, with_recorded_base
from simoe.router import Router, masked_mean
from simoe.targets import decoder_layers

CONFIG_NAME = "smear_config.json"
WEIGHTS_NAME = "smear_model.safetensors"


class SMEARMLP(nn.Module):
    """E stacked copies of a gated FFN, merged per example with the routing set by :meth:`set_routing`."""

    def __init__(self, mlp: nn.Module, num_experts: int, init_noise: float = 0.0):
        super().__init__()
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts) or not hasattr(mlp, "act_fn"):
            raise ValueError(f"SMEAR needs a gated FFN with bias-free gate_proj, up_proj, down_proj and "
                             f"act_fn (Llama, Mistral, Qwen2, Gemma style); got {type(mlp).__name__}")
        gate, up, down = (p.weight.detach().float() for p in parts)
        gate_up = torch.cat([gate, up])
        self.gate_up = nn.Parameter(self._copies(gate_up, num_experts, init_noise))
        self.down = nn.Parameter(self._copies(down, num_experts, init_noise))
        self.act_fn = mlp.act_fn
        self.routing: torch.Tensor | None = None  # [batch, E], set before every forward
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _copies(weight: torch.Tensor, n: int, noise: float) -> torch.Tensor:
        copies = weight.expand(n, *weight.shape).clone()
        if noise:
            copies += noise * weight.std() * torch.randn_like(copies)
        return copies

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def set_routing(self, routing: torch.Tensor) -> None:
        self.routing = routing
        self._cached = None

    def merged_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_b = Σ_e r_be W_e for every example b: gate_up [batch, 2I, H], down [batch, H, I].

        Without autograd (generation) they are computed once per routing and reused at every
        decoding step; with autograd they are recomputed on each call, so activation checkpointing
        and every training step see the current experts.
        """
        if self.routing is None:
            raise RuntimeError("SMEARMLP has no routing: run it through SMEARModel (forward / generate)")
        if self._cached is not None and self._cached[0].dtype == dtype:
            return self._cached
        r = self.routing.float()
        merged = (torch.einsum("be,eoi->boi", r, self.gate_up).to(dtype),
                  torch.einsum("be,eoi->boi", r, self.down).to(dtype))
        if not torch.is_grad_enabled():
            self._cached = merged
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.merged_weights(x.dtype)
        batch = gate_up.shape[0]
        if x.shape[0] % batch:
            raise RuntimeError(f"batch of {x.shape[0]} cannot be matched to routing for {batch} examples")
        # generate() with num_beams / num_return_sequences repeats each prompt in place (consecutive
        # rows): folding the repeats into the token axis pairs every row with its prompt's weights.
        h = x.reshape(batch, -1, x.shape[-1])
        gate, up = torch.bmm(h, gate_up.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(self.act_fn(gate) * up, down.transpose(1, 2))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SMEARModel(PromptRoutedModel):
    """Wraps (and modifies in place) ``base_model``: every decoder layer's ``mlp`` becomes a SMEARMLP."""

    layer_class = SMEARMLP
    config_class, config_name, weights_name = BaselineConfig, CONFIG_NAME, WEIGHTS_NAME

    def __init__(self, base_model: PreTrainedModel, options: BaselineConfig):
        super().__init__()
        if any(isinstance(m, SMEARMLP) for m in base_model.modules()):
            raise ValueError("this model already has SMEAR experts; build from a fresh base model")
        base_model.requires_grad_(False)
        for i, layer in enumerate(decoder_layers(base_model)):
            if not hasattr(layer, "mlp"):
                raise ValueError(f"SMEAR: decoder layer {i} of {type(base_model).__name__} has no mlp")
            device = next(layer.mlp.parameters()).device
            layer.mlp = SMEARMLP(layer.mlp, options.num_ffn_experts, options.smear_init_noise).to(device)
        options = with_recorded_base(options, base_model)
        self.options = options
        self.base_model = base_model
        embeddings = base_model.get_input_embeddings()
        self.router = Router(embeddings.weight.shape[1], options.num_ffn_experts,
                             options.smear_router_hidden_size, temperature=1.0).to(embeddings.weight.device)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role, for separate learning rates."""
        layers = [layer for _, layer in self.routed_layers()]
        return {"experts": [p for layer in layers for p in (layer.gate_up, layer.down)],
                "router": list(self.router.parameters())}

    # ---------------------------------------------------------------- routing
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The routing [batch, E] (rows sum to 1) from the prompt tokens' mean input embedding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask if prompt_mask is None else attention_mask * prompt_mask
        with torch.no_grad():  # the embeddings are frozen
            features = masked_mean(self.base_model.get_input_embeddings()(input_ids).float(), mask)
        return self.router(features)

    def set_routing(self, routing: torch.Tensor) -> None:
        """Give every layer the routing [batch, E] its experts are merged with."""
        routing = self.checked_routing(routing, self.options.num_ffn_experts)
        for _, layer in self.routed_layers():
            layer.set_routing(routing)

    # ---------------------------------------------------------------- persistence
    def routed_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define the model beyond its base: the expert copies and the router."""
        state = {}
        for name, layer in self.routed_layers():
            state[f"{name}.gate_up"] = layer.gate_up
            state[f"{name}.down"] = layer.down
        for key, value in self.router.state_dict().items():
            state[f"router.{key}"] = value
        return state
