"""SIMoEModel: a frozen Hugging Face causal LM upcycled with sparse interpolated experts."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from simoe import hard_concrete, objectives
from simoe.config import CONFIG_NAME, WEIGHTS_NAME, SIMoEConfig
from simoe.data import template_affixes
from simoe.layer import SIMoELayer, SIMoELinear, SIMoENorm, active_columns
from simoe.routed_model import PromptRoutedModel, with_recorded_base
from simoe.router import Router, masked_mean, skip_template
from simoe.targets import decoder_layers, find_targets, is_linear


class _StopForward(Exception):
    """Raised by a hook to end the base model's forward once the router's layer has run."""


class SIMoEModel(PromptRoutedModel):
    """Wraps (and modifies in place) ``base_model``: every targeted module becomes a SIMoE layer.

    Use :func:`upcycle` to build one and :meth:`from_pretrained` to load a saved one.
    """

    layer_class = SIMoELayer
    config_class, config_name, weights_name = SIMoEConfig, CONFIG_NAME, WEIGHTS_NAME
    _folded = False  # inside folded(): the routing lives in the layers' weights
    # What training recorded for the model card (the recipe sets it): data, examples, steps, load.
    training_record: dict | None = None
    # generate() folds a routing shared by the whole batch into the weights (base speed; a copy of
    # the weight columns it overwrites while it runs); False: decode it on the masked path instead.
    fold_shared_routing = True

    def __init__(self, base_model: PreTrainedModel, config: SIMoEConfig):
        super().__init__()
        if any(isinstance(m, SIMoELayer) for m in base_model.modules()):
            raise ValueError("this model is already upcycled; upcycle a fresh base model")
        targets = find_targets(base_model, config)
        base_model.requires_grad_(False)
        for name, module in targets:
            cls = SIMoELinear if is_linear(module) else SIMoENorm
            layer = cls(module, config.num_experts, config.mask_init_logit, config.mask_init_std,
                        config.gate_regime)
            base_model.set_submodule(name, layer)
        config = with_recorded_base(config, base_model)
        self.simoe_config = config
        self.base_model = base_model

        embeddings = base_model.get_input_embeddings()
        if config.router_input == "embedding-mean":
            input_size = embeddings.weight.shape[1]
        else:
            input_size = base_model.config.get_text_config().hidden_size
            layers = decoder_layers(base_model)
            k = len(layers) // 2 if config.router_hidden_layer is None else config.router_hidden_layer
            if not 0 <= k < len(layers):
                raise ValueError(f"router_hidden_layer={k} outside [0, {len(layers)})")
            self._router_layer = layers[k]
        self.router = Router(
            input_size, config.num_experts, config.router_hidden_size, config.router_temperature
        ).to(embeddings.weight.device)
        # Gate noise comes from this generator when set (see seed_gates), else torch's global RNG.
        self.gate_generator: torch.Generator | None = None

    # ---------------------------------------------------------------- structure
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role, for separate learning rates (Δ, mask logits, router)."""
        layers = [layer for _, layer in self.routed_layers()]
        return {
            "delta": [layer.delta for layer in layers],
            "mask_logits": [layer.log_alpha for layer in layers],
            "router": list(self.router.parameters()),
        }

    @torch.no_grad()
    def clamp_mask_logits_(self) -> None:
        """Keep log α in its bounded range; call after every optimizer step.

        Clamping the data (not the forward value) keeps the gradient alive at the bounds.
        """
        for _, layer in self.routed_layers():
            layer.log_alpha.clamp_(self.simoe_config.mask_logit_min, self.simoe_config.mask_logit_max)

    def set_router_temperature(self, temperature: float) -> None:
        self.router.temperature.fill_(float(temperature))

    def seed_gates(self, seed: int) -> torch.Generator:
        """Draw training gate noise from a dedicated generator seeded with ``seed``.

        Data-parallel ranks seed it identically, so every rank samples the same gates each step and
        the run equals a single process with the global batch. Its state is checkpointed.
        """
        device = self.router.temperature.device
        self.gate_generator = torch.Generator(device=device).manual_seed(seed)
        return self.gate_generator

    # ---------------------------------------------------------------- routing
    def route(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routing [batch, M] (rows sum to 1) from the prompt tokens only.

        Prompt tokens are those with ``prompt_mask`` = 1 (when given) and ``attention_mask`` = 1.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask if prompt_mask is None else attention_mask * prompt_mask
        c = self.simoe_config
        if c.router_span == "user":
            mask = skip_template(input_ids, mask, c.template_prefix_ids, c.template_suffix_ids)
        with torch.no_grad():  # the base is frozen: its features need no graph
            if self.simoe_config.router_input == "embedding-mean":
                hidden = self.base_model.get_input_embeddings()(input_ids)
            else:
                hidden = self._hidden_states(input_ids, attention_mask)
            features = masked_mean(hidden.float(), mask)
        return self.router(features)

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Output of the router's decoder layer under the *base* weights (a partial forward)."""
        captured = {}

        def grab(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        # Positions from the mask, so left- and right-padded prompts see the same positions.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        handle = self._router_layer.register_forward_hook(grab)
        try:
            with self.bypass():
                self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["hidden"]

    def set_routing(self, routing: torch.Tensor) -> None:
        """Merge every layer's expert masks with ``routing`` [batch, M]: m = r @ z.

        Gates are drawn here, once per forward: the training gates in train mode (sampled for the
        stochastic regime), the evaluation gates in eval mode.
        """
        if self._folded:
            raise RuntimeError("inside folded() the routing is folded into the weights: run base_model")
        routing = self.checked_routing(routing, self.simoe_config.num_experts)
        linears, linear_gates = [], []
        for _, layer in self.routed_layers():
            gates = layer.merge_experts(routing, layer.gates(self.gate_generator))
            if isinstance(layer, SIMoELinear):
                linears.append(layer)
                linear_gates.append(gates)
        for layer, active in zip(linears, active_columns(linear_gates), strict=True):
            layer.set_active(active)  # one host synchronisation for all the layers, not one per layer

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Inside this context the model computes exactly the frozen base model."""
        layers = [layer for _, layer in self.routed_layers()]
        saved = [layer.merged_gates for layer in layers]
        for layer in layers:
            layer.merged_gates = None
        try:
            yield
        finally:
            for layer, merged_gates in zip(layers, saved, strict=True):
                layer.merged_gates = merged_gates

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 routing: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``transformers`` generation; the routing is computed from each prompt once. In eval mode a
        batch whose prompts share one routing (a single prompt, or one fixed routing) decodes with
        the experts folded into the weights (:meth:`folded`), at the base model's cost per token."""
        if routing is None:
            routing = self.route(input_ids, attention_mask)
        routing = self.checked_routing(routing, self.simoe_config.num_experts)
        if self.fold_shared_routing and not self.training and bool((routing == routing[:1]).all()):
            with self.folded(routing[0]):
                return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return super().generate(input_ids, attention_mask, routing=routing, **kwargs)

    @contextlib.contextmanager
    def folded(self, routing: torch.Tensor) -> Iterator[None]:
        """Inside this context the model runs at the base model's cost for one routing [M]: every
        SIMoE layer's base weight holds W0 + Δ·diag(m), m = routing @ (evaluation gates), and the
        layer computes just its base (:meth:`SIMoELayer.fold_`). On exit, also after an exception,
        the original weights are back, bit for bit (the same tensor objects). Eval mode only; while
        it lasts it holds a copy of the weight columns it overwrote (about the union density).
        """
        if self.training:
            raise RuntimeError("folded() is for evaluation: call model.eval() first")
        routing = self.checked_routing(routing.reshape(1, -1), self.simoe_config.num_experts)[0]
        params = self.base_model.named_parameters(remove_duplicate=False)
        holders = collections.Counter(id(p) for _, p in params)
        restores = []
        self._folded = True
        try:
            with self.bypass():  # the layers compute just their (folded) base
                for _, layer in self.routed_layers():
                    tied = holders[id(layer.base.weight)] > 1  # written in place, another module would see it
                    restores.append(layer.fold_(routing @ layer.eval_gates(), in_place=not tied))
                yield
        finally:
            for restore in reversed(restores):
                restore()
            self._folded = False

    def model_card(self) -> str:
        """What the checkpoint holds and how to load and export it (``README.md``)."""
        from simoe.model_card import simoe_model_card

        return simoe_model_card(self.simoe_config.to_dict(), self.sparsity_report(), self.training_record)

    # ---------------------------------------------------------------- reports
    @torch.no_grad()
    def sparsity_report(self) -> dict:
        """Expected (training gates) and deterministic (evaluation gates) density of every expert and
        of their union; the same numbers for noise-free gates."""
        layers = [layer for _, layer in self.routed_layers()]
        exp_expert, exp_union = objectives.expected_density(layers)
        det_expert, det_union, total = objectives.deterministic_nonzero(layers)

        def entry(expected: torch.Tensor, nonzero: int) -> dict:
            return {
                "expected_density": float(expected),
                "deterministic_density": nonzero / total,
                "nonzero_params": int(nonzero),
            }

        return {
            "num_experts": self.simoe_config.num_experts,
            "target_density": self.simoe_config.target_density,
            "upcycled_modules": len(layers),
            "upcycled_params": total,
            "experts": [entry(e, int(n)) for e, n in zip(exp_expert, det_expert, strict=True)],
            "union": entry(exp_union, int(det_union)),
        }

    # ---------------------------------------------------------------- compaction
    @torch.no_grad()
    def compact_(self, kept: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Drop from every SIMoE linear layer's Δ and log α the input columns every expert gates off
        (:meth:`SIMoELinear.compact_`), so that Δ and its optimizer state shrink to about the union
        density; with ``kept`` ({layer name: input columns}, what :meth:`compacted_columns` gave),
        keep exactly those. Noise-free gates only: a stochastic gate can be sampled on anywhere.
        Returns {layer name: the kept columns as indices into the layer's Δ before the call}.
        """
        self.check_compactable()
        local = {}
        for name, layer in self.routed_layers():
            if not isinstance(layer, SIMoELinear):
                continue  # a norm's Δ is one vector: nothing worth dropping
            if kept is None:
                keep = layer.gates_on().any(dim=0).nonzero().squeeze(1)
            elif layer.kept is not None:
                raise ValueError(f"{name} is compacted already: pass kept columns to an uncompacted model")
            else:
                keep = kept[name].to(device=layer.delta.device, dtype=torch.long)
            layer.compact_(keep)
            local[name] = keep
        return local

    def check_compactable(self) -> None:
        """Refuse options under which dropping columns would not be exact (:meth:`compact_`)."""
        c = self.simoe_config
        if c.gate_regime != "noise-free":
            raise ValueError(f"compaction needs gate_regime='noise-free', not {c.gate_regime!r}: "
                             "a stochastic gate can be sampled on in any column")
        if hard_concrete.noise_free(torch.tensor(c.mask_logit_min)) != 0:
            raise ValueError(f"compaction needs mask_logit_min < {hard_concrete.NOISE_FREE_ZERO:.3f} "
                             f"(a gate of 0 for the dropped columns), got {c.mask_logit_min}")

    @torch.no_grad()
    def expand_(self) -> None:
        """Undo :meth:`compact_`: every layer's Δ and log α at the full width again."""
        for _, layer in self.routed_layers():
            if isinstance(layer, SIMoELinear) and layer.kept is not None:
                layer.expand_(self.simoe_config.mask_logit_min)

    def compacted_columns(self) -> dict[str, torch.Tensor]:
        """{layer name: the input columns its Δ holds} for every compacted layer."""
        return {name: layer.kept for name, layer in self.routed_layers() if layer.kept is not None}

    def load_routed_weights(self, directory: str | os.PathLike) -> None:
        if self.compacted_columns():  # the tensors would load into full-width copies, then vanish
            raise RuntimeError("load into an uncompacted model: call expand_() first")
        super().load_routed_weights(directory)

    # ---------------------------------------------------------------- persistence
    @property
    def options(self) -> SIMoEConfig:
        """``simoe_config``, under the name the routed-model base saves and loads."""
        return self.simoe_config

    def routed_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define a SIMoE model beyond its base: Δ, log α, router; a compacted
        layer's at the full width (:meth:`compact_`), so every checkpoint loads the same way."""
        state = {}
        for name, layer in self.routed_layers():
            delta, log_alpha = layer.full_tensors(self.simoe_config.mask_logit_min)
            state[f"{name}.delta"], state[f"{name}.log_alpha"] = delta, log_alpha
        for key, value in self.router.state_dict().items():
            state[f"router.{key}"] = value
        return state


def upcycle(base_model: PreTrainedModel, config: SIMoEConfig | None = None,
            tokenizer: PreTrainedTokenizerBase | None = None) -> SIMoEModel:
    """Freeze ``base_model`` and upcycle its targeted modules into SIMoE layers (in place).

    Right after upcycling Δ = 0, so the model computes exactly what the base model computes.
    With ``tokenizer``, the chat template's fixed text around the user turn is recorded in the
    config, so that ``router_span='user'`` skips it.
    """
    config = config if config is not None else SIMoEConfig()
    if tokenizer is not None and config.template_prefix_ids is None:
        prefix, suffix = template_affixes(tokenizer)
        config = dataclasses.replace(config, template_prefix_ids=prefix, template_suffix_ids=suffix)
    return SIMoEModel(base_model, config)
