"""Optional dependencies: imported where a feature needs them, with an error naming the extra that
installs them (``pip install 'simoe[baselines]'``, ``'simoe[eval]'``)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"peft": "baselines", "lm_eval": "eval"}


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported, or ImportError saying which extra brings it for ``feature``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{feature} needs the {module.split('.')[0]} package: "
                          f"pip install 'simoe[{EXTRAS[module.split('.')[0]]}]'") from e
