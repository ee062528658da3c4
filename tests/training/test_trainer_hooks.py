"""The private transformers.Trainer methods simoe overrides (docs/architecture.md says why): this
fails loudly when a transformers release renames one, changes its parameters or stops calling it."""

import inspect

import pytest
from transformers import Trainer

from simoe.training.baseline_trainer import BaselineTrainer
from simoe.training.trainer import SIMoETrainer

PINNED = {  # method: its parameters in transformers' Trainer
    "_get_output_dir": ["self", "trial"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_save": ["self", "output_dir", "state_dict"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_save_rng_state": ["self", "output_dir"],
    "_load_rng_state": ["self", "checkpoint"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
}


def _overridden(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items() if name.startswith("_") and not name.startswith("__")
            and callable(value) and hasattr(Trainer, name)}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_overridden_private_trainer_method_still_exists_with_its_parameters_and_is_called(name):
    assert hasattr(Trainer, name), f"transformers' Trainer no longer has {name}: simoe's override is dead"
    assert list(inspect.signature(getattr(Trainer, name)).parameters) == PINNED[name]
    assert f"self.{name}(" in inspect.getsource(Trainer), f"Trainer no longer calls {name}"


def test_every_private_override_is_pinned():
    overridden = set()
    for cls in (SIMoETrainer, BaselineTrainer):
        for klass in cls.__mro__:
            if klass is Trainer:
                break
            overridden |= _overridden(klass)
    assert overridden == set(PINNED)
