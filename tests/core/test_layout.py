"""The package layout is the architecture (docs/architecture.md, "Packages"): each module imports only
its own layer and the layers below it, nothing but the CLI imports a recipe, and files stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "simoe"

# Lowest first. A package stands for all its modules.
LAYERS = [
    {"simoe.io", "simoe.config_base", "simoe.extras"},
    {"simoe.data"},
    {"simoe.config", "simoe.hard_concrete", "simoe.masked_delta", "simoe.layer", "simoe.router",
     "simoe.targets", "simoe.objectives", "simoe.routed_model", "simoe.model", "simoe.model_card",
     "simoe.parameters", "simoe.hub"},
    {"simoe.baselines"},
    {"simoe.training", "simoe.inference"},
    {"simoe.evaluation"},
    {"simoe.analysis"},
    {"simoe.recipes", "simoe.cli", "simoe"},
]
MAX_LINES = 350  # "short enough to read in one sitting (~300 lines)"


def layer_of(module: str) -> int:
    for depth in (3, 2, 1):
        name = ".".join(module.split(".")[:depth])
        for i, layer in enumerate(LAYERS):
            if name in layer:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it to the one it belongs to")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every simoe module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "simoe":
            if node.module == "simoe":
                found |= {f"simoe.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "simoe"}
    return found


def violations(modules: dict[str, set[str]]) -> list[str]:
    """What breaks the layering, for ``{module: the simoe modules it imports}``."""
    bad = []
    for module, targets in modules.items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
            if target.startswith("simoe.recipes") and not module.startswith(("simoe.recipes", "simoe.cli")):
                bad.append(f"{module} imports the recipe {target}")
    return bad


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_imports_only_its_layer_and_below():
    assert violations({module_name(path): imports(path) for path in MODULES}) == []


def test_an_upward_import_and_a_recipe_import_are_reported():
    assert violations({"simoe.data.records": {"simoe.training.trainer", "simoe.io"},
                       "simoe.analysis.report": {"simoe.recipes.train"}}) == [
        "simoe.data.records (layer 1) imports simoe.training.trainer (layer 4)",
        "simoe.analysis.report (layer 6) imports simoe.recipes.train (layer 7)",
        "simoe.analysis.report imports the recipe simoe.recipes.train",
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_files_read_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
