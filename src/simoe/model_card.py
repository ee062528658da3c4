"""The model card (``README.md``) a SIMoE checkpoint carries: what it holds and how to use it, as PEFT
and TRL write one beside their adapters."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SHOWN_OPTIONS = ("num_experts", "target_modules", "target_sparsity", "sparsity_scope", "gate_regime",
                 "upcycle_norms", "router_input", "router_span", "router_temperature",
                 "router_min_temperature")


def _cell(value: object) -> str:
    """``value`` for a Markdown table cell: a | (a regex's alternatives) would end the cell."""
    return str(value).replace("|", "\\|")


def _training_section(record: dict | None) -> str:
    """What the model was trained on and how the router divides those prompts (empty when unknown)."""
    if not record:
        return ""
    load = ", ".join(f"E{i} {share:.1%}" for i, share in enumerate(record["routing_load"]))
    return f"""
## Training

Data: `{record['data']}`, {record['examples']:,} examples, {record['steps']:,} optimizer steps.
Mean routing over the first {record['routing_prompts']:,} training prompts (each expert's share of
the load): {load}.
"""


def simoe_model_card(options: dict, report: dict, training: dict | None = None) -> str:
    """Markdown (with Hub metadata) for a checkpoint of ``options`` (``SIMoEConfig.to_dict()``) whose
    ``SIMoEModel.sparsity_report()`` is ``report``; ``training``: what the recipe recorded (data,
    examples, steps, routing load), when known."""
    try:
        release = version("simoe")
    except PackageNotFoundError:  # run from a source tree that is not installed
        release = "(source tree)"
    base = options.get("base_model_name_or_path") or "(not recorded)"
    union = report["union"]
    experts = ", ".join(f"{e['deterministic_density']:.1%}" for e in report["experts"])
    rows = "\n".join(f"| `{name}` | `{_cell(options[name])}` |" for name in SHOWN_OPTIONS if name in options)
    return f"""---
library_name: simoe
base_model: {base}
tags:
- simoe
- mixture-of-experts
- sparse-upcycling
---

# SIMoE: {report['num_experts']} sparse experts upcycled from {base}

Trained with simoe {release}. The base model is frozen. Every targeted
tensor has one shared trainable Δ and {report['num_experts']} structured masks over its input
columns; these masks are the experts. A router reads the prompt and merges the masked experts into
the base weights: W(x) = W0 + Δ·diag(r(x) @ z). This directory holds only simoe's own tensors
(`simoe_model.safetensors`) and options (`simoe_config.json`). The base weights are loaded from
`{base}`.

## Options

| option | value |
| --- | --- |
{rows}

## Sparsity (evaluation gates)

{union['deterministic_density']:.1%} of the {report['upcycled_params']:,} upcycled parameters are
non-zero in at least one expert (target {report['target_density']:.1%}), over
{report['upcycled_modules']} upcycled modules. Per expert: {experts}.
{_training_section(training)}
## Load and generate

```python
from simoe import SIMoEModel

model = SIMoEModel.from_pretrained("THIS_DIRECTORY")  # loads {base}, then the SIMoE tensors
```

```
simoe generate --checkpoint THIS_DIRECTORY --prompt "..."
```

## Export

```
simoe export --checkpoint THIS_DIRECTORY --mode compact --output_dir OUT   # only the kept Δ columns
simoe export --checkpoint THIS_DIRECTORY --mode merged --routing expert:0 --output_dir OUT
```

The merged export is a plain transformers model for one fixed routing.
"""
