"""The ``simoe`` command line: a thin layer over the library, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from simoe.pipeline import add_config_arguments, config_from_args, parse_train_args, run_train


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


def train(argv: list[str]) -> None:
    """Upcycle a model with SIMoE and instruction-tune it (see `simoe train --help`)."""
    run_train(*parse_train_args(argv))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its own HfArgumentParser (TrainingArguments has ~100 options)
        return _run("train", lambda: train(argv[1:]))
    parser = argparse.ArgumentParser(prog="simoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help=train.__doc__, add_help=False)
    p = commands.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    p.add_argument("model_name_or_path", help="Hugging Face hub id or local directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_config_arguments(p)
    args = parser.parse_args(argv)
    _run(args.command, lambda: {"inspect": inspect}[args.command](args))


def _run(command: str, job) -> None:
    try:
        job()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"simoe {command}: error: {e}", file=sys.stderr)
        sys.exit(2)
