"""Check SIMoE's sharded training on GPUs: DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 through accelerate, each
with the shipped config, against one unsharded process that sees the same global batch.

    python benchmarks/check_distributed.py                       # every case, on every visible GPU
    python benchmarks/check_distributed.py --cases fsdp2 --nproc 2
    python benchmarks/check_distributed.py --bf16                # Trainer's bf16 (DeepSpeed's bf16 mode)

Each case trains a tiny random SIMoE Llama (built here, nothing is downloaded) for a few steps with
SIMoETrainer, launched as a user launches it: ``torchrun`` with ``--deepspeed configs/deepspeed/
zero{2,3}.json``, and ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``. A case
passes when

* the run was sharded as asked: DeepSpeed at that ZeRO stage (ZeRO-3: partitioned parameters),
  FSDP2 with DTensor parameters;
* its last checkpoint and its final directory hold every trainable tensor whole (the unsharded
  run's keys and shapes), in fp32 and finite, and ``SIMoEModel.from_pretrained`` loads them;
* they equal the unsharded run's within ``--rtol`` / ``--atol``.

It trains the CPU tests' tiny model and data (tests/conftest.py, tests/train_tiny.py: install the
`dev` extra). One line per case; exit status 0 when every case passes, 1 when one fails, 2 when nothing can be
checked here (no CUDA GPU; DeepSpeed missing for a ZeRO case). About 1-2 minutes on one GPU (with
one GPU the sharded runs have one process: the ZeRO / FSDP2 code paths run, the sharding is
trivial). The CPU test suite covers FSDP2 on gloo (tests/training/test_sharded_training.py), and
ZeRO-2/3 on DeepSpeed's CPU accelerator where deepspeed is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEEPSPEED_CONFIGS = {"zero2": REPO / "configs" / "deepspeed" / "zero2.json",
                     "zero3": REPO / "configs" / "deepspeed" / "zero3.json"}
FSDP2_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yaml"
CASES = ("zero2", "zero3", "fsdp2")
WEIGHTS = "simoe_model.safetensors"

# A failing run's stderr line, and what it means (what the trainer is known to get wrong).
KNOWN = [("ds_id", "a DeepSpeed-partitioned tensor was used outside its module's forward")]


# ---------------------------------------------------------------------------------------- the run
def tiny_parts():
    """The tests' tiny random Llama (``tiny_model``), its training set and collator
    (tests/conftest.py, tests/train_tiny.py: the same the CPU tests train)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_model, train_without_dropout
    from train_tiny import collate, dataset

    return tiny_model, train_without_dropout, dataset, collate


def worker(case: str, out: Path, batch: int, steps: int, bf16: bool) -> None:
    """One training run (under torchrun / accelerate launch for a sharded case); OUT/run.json says
    how it was sharded."""
    import torch
    from transformers import TrainerCallback

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # Built before the training arguments: with a ZeRO-3 config they make transformers build every
    # model under deepspeed.zero.Init, partitioned before it could be upcycled.
    tiny_model, train_without_dropout, dataset, collate = tiny_parts()
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4, target_sparsity=0.5))
    train_without_dropout(model)
    args = SIMoETrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-3,
        logging_steps=1, save_steps=steps, report_to="none", disable_tqdm=True, seed=7, bf16=bf16,
        dataloader_num_workers=0,
        deepspeed=str(DEEPSPEED_CONFIGS[case]) if case in DEEPSPEED_CONFIGS else None,
    )
    trainer = SIMoETrainer(model, args, train_dataset=dataset(), data_collator=collate)

    class Inspect(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and state.global_step == 1:
                ds = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
                facts = {"distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
                         "processes": trainer.accelerator.num_processes,
                         "zero_stage": ds.zero_stage if ds is not None else None,
                         "kinds": sorted({type(p).__name__ for p in model.parameters() if p.requires_grad}),
                         "partitioned": any(hasattr(p, "ds_id") for p in model.parameters())}
                (out / "run.json").write_text(json.dumps(facts))

    trainer.add_callback(Inspect())
    trainer.train()
    trainer.save_model(str(out / "final"))


# ---------------------------------------------------------------------------------------- checks
def check_saved(run: Path, reference: Path, steps: int, rtol: float, atol: float) -> list[str]:
    """What is wrong with the tensors ``run`` saved, measured against the unsharded ``reference``."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in (f"checkpoint-{steps}", "final"):
        path = run / name / WEIGHTS
        if not path.is_file():
            problems.append(f"{name}: no {WEIGHTS}")
            continue
        saved, expected = load_file(path), load_file(reference / name / WEIGHTS)
        if saved.keys() != expected.keys():
            missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
            problems.append(f"{name}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
            continue
        worst = 0.0
        for key, want in expected.items():
            got = saved[key]
            if got.shape != want.shape:
                problems.append(f"{name}: {key} has shape {tuple(got.shape)}, not {tuple(want.shape)} "
                                "(a shard?)")
            elif got.dtype != torch.float32:
                problems.append(f"{name}: {key} saved as {got.dtype}, not float32 (the 16-bit copy "
                                "DeepSpeed's bf16 mode trains with; the fp32 one is in its optimizer)")
            elif not torch.isfinite(got).all():
                problems.append(f"{name}: {key} is not finite")
            elif not torch.allclose(got, want, rtol=rtol, atol=atol):
                worst = max(worst, (got - want).abs().max().item())
        if worst:
            problems.append(f"{name}: differs from the unsharded run by up to {worst:.2e} "
                            f"(rtol {rtol:g}, atol {atol:g})")
    return problems


def check_loads(run: Path) -> list[str]:
    """SIMoEModel.from_pretrained loads the final directory, and holds exactly what was saved."""
    import torch
    from safetensors.torch import load_file

    from simoe import SIMoEModel

    try:
        model = SIMoEModel.from_pretrained(tiny_parts()[0]("llama"), run / "final")
    except Exception as e:  # reported, not raised: the other cases still run
        return [f"SIMoEModel.from_pretrained failed: {type(e).__name__}: {e}"]
    saved, routed = load_file(run / "final" / WEIGHTS), model.routed_state_dict()
    wrong = [k for k in saved if not torch.equal(routed[k].to(saved[k].dtype), saved[k])]
    return [f"from_pretrained: {len(wrong)} tensors differ from the file, e.g. {wrong[0]}"] if wrong else []


def check_sharding(case: str, run: Path) -> list[str]:
    """Whether the run was sharded as the case asks (its run.json)."""
    path = run / "run.json"
    if not path.is_file():
        return ["no run.json: the run never finished a step"]
    facts = json.loads(path.read_text())
    want = {"zero2": {"distributed_type": "DEEPSPEED", "zero_stage": 2},
            "zero3": {"distributed_type": "DEEPSPEED", "zero_stage": 3, "partitioned": True},
            "fsdp2": {"distributed_type": "FSDP", "kinds": ["DTensor"]}}[case]
    return [f"{key} was {facts.get(key)!r}, not {value!r}" for key, value in want.items()
            if facts.get(key) != value]


# ---------------------------------------------------------------------------------------- driver
def cannot_run(cases: list[str]) -> str | None:
    """Why nothing can be checked here, or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return ("no CUDA GPU (torch.cuda.is_available() is False). The CPU tests check FSDP2 on gloo "
                "(tests/training/test_sharded_training.py); DeepSpeed needs a GPU")
    missing = [case for case in cases if case in DEEPSPEED_CONFIGS]
    if missing and importlib.util.find_spec("deepspeed") is None:
        return (f"DeepSpeed is not installed, and the cases {', '.join(missing)} need it "
                "(pip install deepspeed, or --cases fsdp2)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, nproc: int, out: Path, batch: int, steps: int, bf16: bool,
           timeout: float) -> tuple[int, str, float]:
    """Run one case's training; (exit status, the log's tail, seconds)."""
    work = [str(SCRIPT), "--worker", case, "--output_dir", str(out), "--batch", str(batch),
            "--steps", str(steps), *(["--bf16"] if bf16 else [])]
    if case == "reference":
        cmd = [sys.executable, *work]
    elif case == "fsdp2":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), *work]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *work]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out.parent / f"{case}.log", "w") as log:
        try:
            status = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = -1
    text = (out.parent / f"{case}.log").read_text(errors="replace")
    return status, text, time.perf_counter() - start


def explain(log: str) -> str:
    hints = [why for line, why in KNOWN if line in log]
    tail = "\n".join("      " + line for line in log.strip().splitlines()[-15:])
    return ("    known: " + "; ".join(hints) + "\n" if hints else "") + tail


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 all pass, 1 a case fails, 2 nothing can be checked "
                                       "here.")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="which to check: zero2 (DeepSpeed ZeRO-2), zero3 (ZeRO-3), fsdp2 (accelerate FSDP2)")
    p.add_argument("--nproc", type=int, default=None, help="processes per sharded run (default: every GPU)")
    p.add_argument("--batch", type=int, default=2,
                   help="per-process batch; the unsharded run takes nproc times it")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--bf16", action="store_true",
                   help="train with Trainer's --bf16 (DeepSpeed's bf16 mode, FSDP2 mixed precision) and a "
                        "looser tolerance")
    p.add_argument("--rtol", type=float, default=None, help="default 1e-3 (5e-2 with --bf16)")
    p.add_argument("--atol", type=float, default=None, help="default 1e-4 (5e-3 with --bf16)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--output_dir", default=None, help="where runs and logs go (default: a temporary folder)")
    p.add_argument("--worker", choices=("reference", *CASES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(REPO / "src"))  # a checkout that is not installed
    if args.worker:
        worker(args.worker, Path(args.output_dir), args.batch, args.steps, args.bf16)
        return 0
    why = cannot_run(args.cases)
    if why:
        print(f"check_distributed: nothing checked: {why}", file=sys.stderr)
        return 2
    import torch

    nproc = args.nproc or torch.cuda.device_count()
    rtol = args.rtol if args.rtol is not None else (5e-2 if args.bf16 else 1e-3)
    atol = args.atol if args.atol is not None else (5e-3 if args.bf16 else 1e-4)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="check_distributed_"))
    print(f"{nproc} process(es) per sharded run, {args.batch} sequences each, {args.steps} steps; "
          f"the unsharded run takes {nproc * args.batch} per step. Runs and logs: {root}")
    status, log, seconds = launch("reference", 1, root / "reference", nproc * args.batch, args.steps,
                                  args.bf16, args.timeout)
    if status != 0:
        print(f"FAIL  reference (one unsharded process) exited with {status} after {seconds:.0f} s\n"
              f"{explain(log)}")
        return 1
    failed = 0
    for case in args.cases:
        status, log, seconds = launch(case, nproc, root / case, args.batch, args.steps, args.bf16,
                                      args.timeout)
        if status != 0:
            problems = [f"exited with {status}" + (" (timed out)" if status == -1 else "")]
            detail = explain(log)
        else:
            problems = (check_sharding(case, root / case)
                        + check_saved(root / case, root / "reference", args.steps, rtol, atol)
                        + check_loads(root / case))
            detail = ""
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '}  {case:6s} {seconds:5.0f} s"
              + "".join(f"\n    {p}" for p in problems) + (f"\n{detail}" if detail else ""))
    print(f"{len(args.cases) - failed} of {len(args.cases)} cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
