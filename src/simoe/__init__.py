"""simoe: Sparse Interpolated Mixture-of-Experts upcycling for Hugging Face causal LMs."""

from simoe.config import SIMoEConfig
from simoe.layer import SIMoELayer, SIMoELinear, SIMoENorm
from simoe.model import SIMoEModel, upcycle
from simoe.router import Router

__all__ = [
    "SIMoEConfig",
    "SIMoETrainer",
    "SIMoETrainingArguments",
    "SIMoELayer",
    "SIMoELinear",
    "SIMoEModel",
    "SIMoENorm",
    "Router",
    "upcycle",
]
__version__ = "0.1.0"

_TRAINING = {"SIMoETrainer": "simoe.training.trainer", "SIMoETrainingArguments": "simoe.training.arguments"}


def __getattr__(name: str):
    """The trainer is imported on first use: ``import simoe`` does not pull in ``transformers.Trainer``."""
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(_TRAINING[name]), name)
    raise AttributeError(f"module 'simoe' has no attribute {name!r}")
