"""``compact_after_warmup``: once the sparsity warm-up has brought the density down to its target
(and the constraint is met: :func:`constraint_met`), the input columns every expert gates off are
dropped from Δ, log α and the optimizer state, so the rest of the run holds and updates about the
union density of full fine-tuning's trainable state.

The dropped columns are frozen off from then on (their gates stay 0). Checkpoints keep Δ and log α
at the full width (``SIMoEModel.routed_state_dict``) plus the kept columns (``COMPACTION_NAME``),
so a resumed run compacts exactly as the interrupted one did before its optimizer state loads; at
the end of training the model is expanded back to the full width, so what follows (generation,
exports, analyses) sees an ordinary SIMoE model.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from simoe.io import read_state, save_state
from simoe.model import SIMoEModel
from simoe.objectives import constrained_density

COMPACTION_NAME = "simoe_compaction.safetensors"


@torch.no_grad()
def compact(model: SIMoEModel, optimizer: torch.optim.Optimizer | None = None,
            kept: dict[str, torch.Tensor] | None = None) -> None:
    """``model.compact_(kept)``, and ``optimizer``'s state (Adam's moments) indexed the same way."""
    local = model.compact_(kept)
    if optimizer is None:
        return
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the optimizer
    layers = dict(model.routed_layers())
    for name, keep in local.items():
        layer = layers[name]
        for param, dim in ((layer.delta, layer.column_dim), (layer.log_alpha, 1)):
            for key, value in state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                    state[param][key] = value.index_select(dim, keep.to(value.device))


def save_compaction(model: SIMoEModel, directory: str) -> None:
    """Record the columns a compacted model's layers hold (nothing when it is not compacted)."""
    columns = model.compacted_columns()
    if columns:
        save_state(columns, os.path.join(directory, COMPACTION_NAME))


def load_compaction(model: SIMoEModel, directory: str, optimizer=None) -> None:
    """Compact ``model`` as the checkpoint in ``directory`` records (nothing when it records none)."""
    path = os.path.join(directory, COMPACTION_NAME)
    if os.path.isfile(path):
        compact(model, optimizer, read_state(path))


def constraint_met(model: SIMoEModel) -> bool:
    """Whether every constrained density (union, or each expert's) is at or above its final target.

    Compaction waits for it: the density often overshoots below the target at the warm-up's end,
    and λ then revives the columns that died last. Dropped columns cannot revive, so compacting in
    the overshoot would leave λ pushing, without end, at a density it cannot reach (in the demo,
    experts five times as dense); from at or above the target the kept columns can still meet it.
    """
    c = model.simoe_config
    with torch.no_grad():
        density = constrained_density(model.routed_layers(), c.sparsity_scope)
    return bool((density >= c.target_density).all())


class CompactAfterWarmup(TrainerCallback):
    """Compact after the first optimizer step, from the end of the sparsity warm-up on, that leaves
    the constraint met (:func:`constraint_met`); expand when training ends."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            raise ValueError("compact_after_warmup works in one process: data-parallel wrappers fix "
                             "the parameters' shapes when they wrap the model")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        simoe = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if (state.global_step >= self.trainer.sparsity_warmup_steps() and not simoe.compacted_columns()
                and constraint_met(simoe)):
            compact(simoe, self.trainer.optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.accelerator.unwrap_model(self.trainer.model).expand_()
