"""The routed-model base: a frozen HF model whose routed layers take one routing per prompt.

SIMoE (``simoe.model``) and the SMEAR baseline (``simoe.baselines.smear``) are its two subclasses;
what they share lives here once: routing in ``forward`` and ``generate``, activation checkpointing,
and saving / loading their own tensors beside the base.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from simoe.config_base import JSONConfig
from simoe.io import load_state_into, save_state, save_text

CARD_NAME = "README.md"  # the model card save_pretrained writes beside the weights


class PromptRoutedModel(nn.Module, abc.ABC):
    """What SIMoE and the SMEAR baseline share: a frozen HF ``base_model`` whose routed layers get
    r(x) from the prompt once per sequence, in training (``forward``) and generation
    (``generate``), and persistence of the model's own tensors beside that base.

    A subclass sets ``config_class`` / ``config_name`` / ``weights_name``, keeps its options in
    ``options`` and defines the three abstract methods.
    """

    layer_class: type[nn.Module]  # the routed layers' type (SIMoELayer, SMEARMLP)
    config_class: type[JSONConfig]
    config_name: str  # file of the options in a saved directory
    weights_name: str  # file of the model's own tensors in a saved directory
    options: JSONConfig
    base_model: nn.Module
    last_routing: torch.Tensor | None = None  # r of the last forward, [batch, M]

    def routed_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name in the base model, layer) for every routed layer."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, self.layer_class):
                yield name, module

    @abc.abstractmethod
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The routing [batch, M] of each sequence, read from its prompt tokens."""

    @abc.abstractmethod
    def set_routing(self, routing: torch.Tensor) -> None:
        """Hand the routing [batch, M] to every routed layer (checked by :meth:`checked_routing`)."""

    @staticmethod
    def checked_routing(routing: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``routing`` in fp32, after checking that it is [batch, num_experts]."""
        if routing.dim() != 2 or routing.shape[1] != num_experts:
            raise ValueError(f"routing must have shape [batch, {num_experts}], got {tuple(routing.shape)}")
        return routing.float()

    @abc.abstractmethod
    def routed_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define the model beyond its frozen base (what is saved and loaded)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        routing: torch.Tensor | None = None,
        **kwargs,
    ):
        """The base model's forward (HF outputs, loss from ``labels``) under the routed layers.

        ``routing`` overrides the router; otherwise it is computed from the prompt tokens.
        """
        if routing is None:
            if input_ids is None:
                raise ValueError("pass input_ids to route on, or an explicit routing")
            if kwargs.get("past_key_values") is not None:
                # input_ids would be only the new tokens: routing on them is not the prompt's
                raise ValueError("decoding with a cache needs routing=model.route(prompt ids); "
                                 "model.generate does this for you")
            routing = self.route(input_ids, attention_mask, prompt_mask)
        self.last_routing = routing  # with its graph: the trainer's routing terms and logs read it
        self.set_routing(routing)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        routing: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``transformers`` generation; the routing is computed from each prompt once."""
        if routing is None:
            routing = self.route(input_ids, attention_mask)
        self.set_routing(routing)
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs) -> None:
        """Activation checkpointing of the base's layers (Trainer calls it for ``--gradient_checkpointing``).

        Non-reentrant by default: the frozen embeddings give the checkpointed layers inputs that need
        no grad, and reentrant checkpointing would then drop the gradients of the routed layers'
        tensors inside them. The routing stays set on the layers, so recomputation uses it (and, for
        SIMoE, the gates the forward drew).
        """
        ckpt_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(ckpt_kwargs, **kwargs)
        else:  # transformers releases before the rename
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kw) -> None:
        """The name older transformers releases call."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    @property
    def config(self):  # the base's HF config, which Trainer and generation utilities read
        return self.base_model.config

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None,
                        is_main_process: bool = True) -> None:
        """Write the options (``config_name``) and the model's own tensors (``weights_name``; no
        base weights), each atomically.

        Sharded models (FSDP2, DeepSpeed ZeRO-3): pass ``state_dict``, this model's full state dict
        as the trainer gathered it (Trainer hands one to ``_save``), and the routed tensors are taken
        from it; without one, sharded tensors (DTensor) are gathered here, a collective that every
        rank must join, and only the one with ``is_main_process`` writes.
        """
        routed = self.routed_state_dict()
        sharded = _is_sharded(routed)
        if state_dict is None:
            state = {key: full_tensor(value) for key, value in routed.items()}
        else:  # routed keys are relative to the base model, except the router's
            state = {key: state_dict[key if key.startswith("router.") else f"base_model.{key}"]
                     for key in routed}
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        self.options.save(os.path.join(directory, self.config_name))
        save_state(state, os.path.join(directory, self.weights_name))
        # a sharded model gets no card: its sparsity report would need the gates gathered first
        card = None if sharded else self.model_card()
        if card is not None:
            save_text(card, os.path.join(directory, CARD_NAME))

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    tokenizer=None, commit_message: str | None = None) -> str:
        """Upload what ``save_pretrained`` writes (and ``tokenizer``'s files) to the Hub repository
        ``repo_id``, creating it if needed, in one commit; returns the commit's URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                       commit_message=commit_message or f"Upload {type(self).__name__}")
        return str(getattr(commit, "commit_url", commit))

    def model_card(self) -> str | None:
        """The README.md that ``save_pretrained`` writes beside the weights (None: none)."""
        return None

    def load_routed_weights(self, directory: str | os.PathLike) -> None:
        """Load the tensors saved in ``directory`` into this model, refusing any mismatch."""
        load_state_into(self.routed_state_dict(), os.path.join(directory, self.weights_name))

    @classmethod
    def from_pretrained(
        cls,
        base_model: PreTrainedModel | str | os.PathLike,
        directory: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        """Rebuild on a base as the saved options say, then load the saved tensors.

        ``from_pretrained(base, directory)`` uses the given base; ``from_pretrained(directory)``
        loads the base recorded in the options (``base_model_name_or_path``), as PEFT's Auto
        classes do. ``directory`` may be a Hub repository ("owner/name") that ``push_to_hub`` wrote.
        """
        load_recorded_base = directory is None
        if load_recorded_base:
            if isinstance(base_model, PreTrainedModel):
                raise ValueError(f"pass the saved directory: {cls.__name__}.from_pretrained(base_model, "
                                 "directory)")
            directory = base_model
        if not os.path.isdir(directory):  # a Hub repository ("owner/name"); a missing path is an error
            from huggingface_hub import snapshot_download

            from simoe.hub import resolve_name

            directory = snapshot_download(resolve_name(directory), allow_patterns=[
                cls.config_name, cls.weights_name, CARD_NAME])
        options = cls.config_class.load_from(directory, cls.config_name)  # read once
        if load_recorded_base:
            recorded = options.base_model_name_or_path
            if not recorded:
                raise ValueError(f"{os.path.join(directory, cls.config_name)}: no base_model_name_or_path "
                                 "recorded; pass the base model: from_pretrained(base_model, directory)")
            from simoe.hub import load_model_and_tokenizer

            base_model, _ = load_model_and_tokenizer(recorded, dtype=dtype)
        model = cls(base_model, options)
        model.load_routed_weights(directory)
        return model


def _is_sharded(state: dict[str, torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(value, DTensor) for value in state.values())


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Inside this context every FSDP2-sharded parameter of ``model`` is whole, for code that reads
    the trainable tensors outside a forward (the trainer's metrics, a sparsity report): a collective
    that every rank must join. Sharded again on exit; a no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded DTensor (FSDP2) gathered from every rank (a collective)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def with_recorded_base(options: JSONConfig, base_model: PreTrainedModel) -> JSONConfig:
    """``options`` with ``base_model_name_or_path`` taken from ``base_model`` when unset (a copy:
    the caller's options are not touched), so a saved directory says which base it needs."""
    if options.base_model_name_or_path is not None:
        return options
    name = getattr(base_model, "name_or_path", None) or None
    return dataclasses.replace(options, base_model_name_or_path=name)
