"""Train a tiny SIMoE Llama with SIMoETrainer; run as a script by test_train.py (also under torchrun).

    python tests/train_tiny.py OUT_DIR '{"max_steps": 8, ...}'

Every log line is appended to OUT_DIR/log.jsonl as it happens, so a killed run leaves its history.
``kill_at`` SIGKILLs the process at the end of that step (no clean-up runs, like a crash).
"""

import json
import os
import signal
import sys

import torch
from conftest import VOCAB, tiny_model, train_without_dropout
from transformers import TrainerCallback

from simoe import SIMoEConfig, upcycle
from simoe.training.arguments import SIMoETrainingArguments
from simoe.training.trainer import SIMoETrainer


def dataset(n: int = 48, seed: int = 0) -> list[dict]:
    """Reverse or sort 5 tokens; prompt lengths differ so padding and token counts vary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        task = i % 2
        digits = torch.randint(10, VOCAB, (3 + i % 3,), generator=g).tolist()
        answer = digits[::-1] if task else sorted(digits)
        prompt = [2 + task, *digits, 1]
        ids = prompt + answer
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + answer,
                     "prompt_mask": [1] * len(prompt) + [0] * len(answer)})
    return rows


def collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": 0, "labels": -100, "prompt_mask": 0}
    batch = {k: torch.tensor([r[k] + [v] * (width - len(r[k])) for r in rows]) for k, v in pad.items()}
    batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows])
    return batch


class Record(TrainerCallback):
    def __init__(self, path: str, kill_at: int | None):
        self.path, self.kill_at = path, kill_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:  # the trainable state's size, which compaction shrinks
            layers = [layer for _, layer in model.routed_layers()]
            params = sum(layer.delta.numel() + layer.log_alpha.numel() for layer in layers)
            with open(os.path.join(args.output_dir, "sizes.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, "params": params}) + "\n")
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, opts = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4, target_sparsity=0.5))
    train_without_dropout(model)
    if opts.get("off"):  # this share of every layer's columns off in every expert, far below 0
        with torch.no_grad():
            for _, layer in model.routed_layers():
                layer.log_alpha[:, : int(opts["off"] * layer.in_features)] = -10.0
    train(out, opts, model, gradient_accumulation_steps=opts.get("accumulation", 1),
          compact_after_warmup=opts.get("compact", False), sparsity_warmup_steps=opts.get("warmup", 0.3),
          mask_learning_rate=opts.get("mask_lr", 0.05))


def train(out: str, opts: dict, model, *callbacks: TrainerCallback, **arguments) -> None:
    """Train ``model`` on :func:`dataset` with the tiny runs' settings (``opts``: max_steps, batch,
    save_steps, resume, kill_at; ``arguments``: further SIMoETrainingArguments), log every step to
    OUT/log.jsonl, save OUT/final and leave the process group, if any (the sharded runs use it too)."""
    args = SIMoETrainingArguments(
        output_dir=out, max_steps=opts["max_steps"], per_device_train_batch_size=opts.get("batch", 4),
        learning_rate=3e-3, logging_steps=1, save_steps=opts.get("save_steps", 4), report_to="none",
        use_cpu=True, disable_tqdm=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        dataloader_num_workers=0, seed=7, **arguments,
    )
    trainer = SIMoETrainer(model, args, train_dataset=dataset(), data_collator=collate)
    for callback in (Record(os.path.join(out, "log.jsonl"), opts.get("kill_at")), *callbacks):
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=opts.get("resume"))
    trainer.save_model(os.path.join(out, "final"))
    if torch.distributed.is_initialized():  # a clean exit: no collective thread left behind
        torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
