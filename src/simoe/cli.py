"""The ``simoe`` command line: a thin layer over the library, one sub-command per job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import Counter

from simoe.config import SIMoEConfig

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field`` per SIMoEConfig field, documented by the field's help text."""
    group = parser.add_argument_group("SIMoE options (SIMoEConfig)")
    for f in dataclasses.fields(SIMoEConfig):
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if f.name == "target_modules":
            group.add_argument("--target_modules", nargs="+", default=None, help=help_text)
        elif f.type in ("bool", bool):
            group.add_argument(f"--{f.name}", type=_parse_bool, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            group.add_argument(f"--{f.name}", type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> SIMoEConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SIMoEConfig)}
    values = {k: v for k, v in values.items() if v is not None}
    targets = values.get("target_modules")
    # One value that is 'all-linear' or a regex stays a string; plain names make a list.
    if targets and len(targets) == 1 and not (_PLAIN_NAME.match(targets[0]) and targets[0] != "all-linear"):
        values["target_modules"] = targets[0]
    return SIMoEConfig(**values)


def inspect(args: argparse.Namespace) -> None:
    """Upcycle a model (without training) and print what SIMoE targets and what it costs."""
    import torch
    from transformers import AutoModelForCausalLM

    from simoe.model import upcycle

    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    base_params = sum(p.numel() for p in base.parameters())
    model = upcycle(base, config_from_args(args))
    kinds = Counter(name.split(".")[-1] for name, _ in model.simoe_layers())
    groups = {k: sum(p.numel() for p in v) for k, v in model.parameter_groups().items()}
    report = {
        "base_model": args.model_name_or_path,
        "base_params": base_params,
        "upcycled_modules_by_name": dict(sorted(kinds.items())),
        "trainable_params": groups,
        "config": model.simoe_config.to_dict(),
        "sparsity": model.sparsity_report(),
    }
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="simoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    p.add_argument("model_name_or_path", help="Hugging Face hub id or local directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_config_arguments(p)
    args = parser.parse_args(argv)
    try:
        {"inspect": inspect}[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"simoe {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
