"""A console a person can read: one compact line per logging step instead of Trainer's metric dict.

The full metric set still goes to the ``report_to`` backends and ``trainer_state.json``.
"""

from __future__ import annotations

import time

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def console_line(logs: dict[str, float], state, seconds_per_step: float | None = None) -> str:
    """One compact line for a training log: step, loss terms, densities, λ, routing, speed."""
    parts = [f"step {state.global_step}/{state.max_steps}"]
    if "nll" in logs:
        parts.append(f"nll {logs['nll']:.3f}")
        if "gate_gap" in logs:
            parts.append(f"gap {logs['gate_gap']:+.3f}")
        parts.append(f"union {logs['density/union_deterministic']:.3f} eval / "
                     f"{logs['density/union_expected']:.3f} exp (target {logs['target_density']:.3f})")
        lambdas = [v for k, v in logs.items() if k == "lambda1" or k.startswith("lambda1/")]
        parts.append(f"λ {max(lambdas):.3g}")
        parts.append(f"H(r) {logs['router_entropy']:.2f}")
    elif "loss" in logs:
        parts.append(f"loss {logs['loss']:.3f}")
    if "grad_norm" in logs:
        parts.append(f"|g| {logs['grad_norm']:.3g}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    return " · ".join(parts)


class _CompactProgress(ProgressCallback):
    """Trainer's progress bar, with one compact line per log instead of the whole metric dict
    (which still goes to ``report_to`` backends and ``trainer_state.json``)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._since = (time.perf_counter(), state.global_step)  # seconds per step since the last log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        if "loss" not in logs and "nll" not in logs:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        now, (then, step) = time.perf_counter(), self._since
        self._since = (now, state.global_step)
        speed = (now - then) / (state.global_step - step) if state.global_step > step else None
        line = console_line(logs, state, speed)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def compact_console(trainer: Trainer) -> None:
    """Swap Trainer's dict-printing callbacks for :class:`_CompactProgress`."""
    for cls in (ProgressCallback, PrinterCallback):
        if trainer.pop_callback(cls) is not None:
            trainer.add_callback(_CompactProgress)
            return

