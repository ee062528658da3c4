"""SIMoE at real shapes: a training step against full fine-tuning and LoRA, decoding against the base.

Llama-3.2-3B-shaped and SmolLM2-135M-shaped models built from configs with random weights (no
download). Training variants, one optimizer step each (forward, backward, AdamW): full fine-tuning,
LoRA r = 16 on every linear layer, SIMoE M = 8 on every linear layer with fresh masks (all columns
on) and with 75 % of every layer's columns gated off in every expert (union density 0.25, as after
training to the paper's sparsity), with Δ at full width and compacted (``compact_after_warmup``).
Decoding: greedy, the base against SIMoE at 0.25 with one shared routing (folded) and with
per-prompt routings. Every figure is a ratio to a baseline measured in the
same run; variants run one after another (a 3B model's variants do not fit on one GPU together).

    python benchmarks/bench_scale.py            # a GPU: bf16, both shapes (a few minutes on an H100/H200)
    python benchmarks/bench_scale.py --quick    # CPU: fp32, a tiny shape, seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from bench_decode import TINY, sparse_simoe
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from simoe import SIMoEConfig, objectives, upcycle

SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def base_model(shape: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights for every variant
    config = LlamaConfig(**shape, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)


def training_variants(shape: dict, dtype: torch.dtype, device: torch.device):
    """(name, build) pairs; build() returns (model, optimizer, loss(batch))."""
    def full():
        model = base_model(shape, dtype, device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), lambda b: model(**b).loss

    def lora():
        model = get_peft_model(base_model(shape, dtype, device), LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-4), lambda b: model(**b).loss

    def simoe(density: float, compacted: bool = False):
        def build():
            model = (sparse_simoe(base_model(shape, dtype, device), density, num_experts=8) if density < 1
                     else upcycle(base_model(shape, dtype, device), SIMoEConfig(target_modules="all-linear")))
            if compacted:  # what compact_after_warmup does once the warm-up has switched columns off
                model.compact_()
            model.train()
            regularizer = objectives.SIMoERegularizer(model.simoe_config, warmup_steps=0).to(device)
            groups = model.parameter_groups()
            optimizer = torch.optim.AdamW([
                {"params": groups["delta"], "lr": 1e-4}, {"params": groups["mask_logits"], "lr": 1e-2},
                {"params": groups["router"], "lr": 1e-3},
                {"params": list(regularizer.parameters()), "lr": 1e-2}])
            return model, optimizer, lambda b: model(**b).loss + regularizer(model.routed_layers(), step=0)[0]
        return build

    return [("full FT", full), ("LoRA r=16", lora), ("SIMoE M=8, fresh masks", simoe(1.0)),
            ("SIMoE M=8, 25% dense", simoe(0.25)), ("SIMoE M=8, 25% dense, compacted", simoe(0.25, True))]


def optimizer_step(optimizer: torch.optim.Optimizer, loss_fn, batch: dict) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        optimizer.step()

    return step


def bench_training(shape: dict, dtype, device, batch: int, seq: int, warmup: int,
                   repeats: int) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (batch, seq), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
              "prompt_mask": torch.cat([torch.ones(batch, seq // 2), torch.zeros(batch, seq - seq // 2)], 1)
              .long().to(device)}
    rows = []
    for name, build in training_variants(shape, dtype, device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model, optimizer, loss_fn = build()
        plain = {k: v for k, v in inputs.items() if k != "prompt_mask"}  # only SIMoE routes on it
        step = optimizer_step(optimizer, loss_fn, inputs if name.startswith("SIMoE") else plain)
        seconds = timed(step, device, warmup, repeats)
        trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        rows.append((name, trainable, seconds, peak_mb(device)))
        del model, optimizer, loss_fn, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_decoding(shape: dict, dtype, device, batch: int, prompt: int, new: int,
                   repeats: int) -> list[tuple]:
    ids = torch.randint(3, shape["vocab_size"], (batch, prompt), generator=torch.Generator()).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, pad_token_id=0)
    base = base_model(shape, dtype, device).eval()
    model = sparse_simoe(base_model(shape, dtype, device), 0.25, num_experts=8)
    shared = torch.softmax(torch.randn(1, 8), -1).expand(batch, 8).to(device)
    mixed = torch.softmax(2 * torch.randn(batch, 8), -1).to(device)
    rows = []
    with torch.inference_mode():
        for name, run in (("base", lambda: base.generate(input_ids=ids, **kwargs)),
                          ("SIMoE 25%, one routing (folded)",
                           lambda: model.generate(input_ids=ids, routing=shared, **kwargs)),
                          ("SIMoE 25%, per-prompt routings",
                           lambda: model.generate(input_ids=ids, routing=mixed, **kwargs))):
            rows.append((name, batch * new / timed(run, device, 1, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, fp32, a tiny shape: the script runs")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"tiny": TINY} if args.quick else {name: SHAPES[name] for name in args.shapes}
    batch, seq, repeats = (2, 64, 2) if args.quick else (4, 256, 5)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for name, shape in shapes.items():
        print(f"\n### {name}-shaped Llama, {where}, {dtype}, training batch {batch} x {seq}, "
              f"median of {repeats}\n")
        rows = bench_training(shape, dtype, device, batch, seq, warmup=1 if args.quick else 2,
                              repeats=repeats)
        full, lora = rows[0][2], rows[1][2]
        print("| variant | trainable params | s / step | vs full FT | vs LoRA | peak memory (MB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for variant, trainable, seconds, memory in rows:
            shown = "–" if memory is None else f"{memory:,.0f}"
            print(f"| {variant} | {trainable:,} | {seconds:.3f} | {seconds / full:.2f}x "
                  f"| {seconds / lora:.2f}x | {shown} |")
        decode = bench_decoding(shape, dtype, device, batch=4, prompt=64, new=8 if args.quick else 32,
                                repeats=repeats)
        print(f"\ngreedy decoding, 4 prompts x 64 tokens, {8 if args.quick else 32} new tokens\n")
        print("| variant | tokens / s | vs base (time) |")
        print("|---|---:|---:|")
        for variant, speed in decode:
            print(f"| {variant} | {speed:.1f} | {decode[0][1] / speed:.2f}x |")


if __name__ == "__main__":
    main()
