"""Where a SIMoE training step's time goes, against full fine-tuning's: torch.profiler, top operators.

A SmolLM2-135M-shaped Llama from a config (random weights), batch 4 x 256; SIMoE M = 8 on every
linear layer and norm at 25 % union density (``bench_decode.sparse_simoe``), with the regulariser
SIMoETrainer adds, with Δ at full width and compacted (``compact_after_warmup``). Prints each
variant's step time and its operators by self time.

    python benchmarks/profile_step.py [--quick] [--steps 3] [--top 15]
"""

from __future__ import annotations

import argparse

import torch
from bench_decode import TINY
from bench_scale import SHAPES, optimizer_step, training_variants
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, seconds")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.quick else SHAPES["SmolLM2-135M"]
    batch, seq = (2, 64) if args.quick else (4, 256)
    ids = torch.randint(3, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    prompt_mask = torch.cat([torch.ones(batch, seq // 2), torch.zeros(batch, seq - seq // 2)], 1).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants = dict(training_variants(shape, dtype, device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in ("full FT", "SIMoE M=8, 25% dense", "SIMoE M=8, 25% dense, compacted"):
        model, optimizer, loss_fn = variants[name]()
        batch_for = {**inputs, "prompt_mask": prompt_mask.to(device)} if name.startswith("SIMoE") else inputs
        step = optimizer_step(optimizer, loss_fn, batch_for)
        step()  # warm-up
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6 / args.steps
        print(f"\n### {name}: {total:.2f} s of self CPU time per step ({args.steps} steps profiled)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        del model, optimizer, loss_fn, step


if __name__ == "__main__":
    main()
