"""simoe: Sparse Interpolated Mixture-of-Experts upcycling for Hugging Face causal LMs."""

from simoe.config import SIMoEConfig
from simoe.layer import SIMoELayer, SIMoELinear, SIMoENorm
from simoe.model import SIMoEModel, upcycle
from simoe.router import Router

__all__ = [
    "SIMoEConfig",
    "SIMoELayer",
    "SIMoELinear",
    "SIMoEModel",
    "SIMoENorm",
    "Router",
    "upcycle",
]
__version__ = "0.1.0"
