"""Greedy decoding speed of SIMoE against its base model, on CPU in fp32.

A SmolLM2-135M-shaped Llama built from a config with random weights (no download; ``--quick``: a
tiny one), upcycled on every linear layer and norm with M = 8 experts, 75 % of every layer's
columns gated off in every expert (union density 0.25). Prompts of equal length, so no padding
differs between variants. Variants, interleaved, median over repeats:

* base: the frozen base model;
* SIMoE, one routing: every prompt shares the routing (a single request, or ``--routing``), so
  ``generate`` folds the experts into the weights;
* SIMoE, per-prompt routings: each prompt has its own routing (what the router gives a batch).

Each call is timed at ``--new_tokens`` and at twice as many: the difference is the cost of the
extra tokens alone (per token), apart from what a call pays once (the prompt's forward, routing,
folding the experts into the weights and restoring them).

    python benchmarks/bench_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from simoe import SIMoEConfig, upcycle

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)


def sparse_simoe(base: torch.nn.Module, density: float, num_experts: int, seed: int = 0):
    """``base`` upcycled, with random Δ and gates, and (1 - density) of every layer's columns off in
    every expert, so the union density is ``density``."""
    model = upcycle(base, SIMoEConfig(num_experts=num_experts, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.routed_layers():
            layer.delta.normal_(0, 0.02, generator=g)
            layer.log_alpha.normal_(1.0, 1.0, generator=g)
            n = layer.in_features
            off = torch.randperm(n, generator=g)[: n - max(1, round(density * n))]
            layer.log_alpha[:, off] = -10.0
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few repeats (seconds)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = TINY if args.quick else SMOLLM2
    repeats = 3 if args.quick else args.repeats
    base = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float32).eval()
    reference.load_state_dict(base.state_dict())  # the base before upcycling wraps its modules
    model = sparse_simoe(base, density=0.25, num_experts=8)
    m = model.simoe_config.num_experts
    ids = torch.randint(3, shape["vocab_size"], (args.batch, args.prompt_len), generator=torch.Generator())
    mask = torch.ones_like(ids)
    shared = torch.softmax(torch.randn(1, m), dim=-1).expand(args.batch, m)
    mixed = torch.softmax(torch.randn(args.batch, m) * 2, dim=-1)
    variants = {
        "base": lambda **kw: reference.generate(input_ids=ids, **kw),
        "SIMoE, one routing (folded)": lambda **kw: model.generate(input_ids=ids, routing=shared, **kw),
        "SIMoE, per-prompt routings": lambda **kw: model.generate(input_ids=ids, routing=mixed, **kw),
    }
    lengths = (args.new_tokens, 2 * args.new_tokens)
    times = {(name, n): [] for name in variants for n in lengths}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for name, run in variants.items():
                for n in lengths:
                    start = time.perf_counter()
                    run(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
                    times[name, n].append(time.perf_counter() - start)
    median = {key: statistics.median(ts[1:]) for key, ts in times.items()}
    short, long = lengths
    params = sum(p.numel() for p in reference.parameters())
    print(f"\n### greedy decoding: {'tiny' if args.quick else 'SmolLM2-135M'}-shaped Llama ({params:,} "
          f"params), {args.batch} prompts x {args.prompt_len} tokens, {short} new tokens, "
          f"{args.threads} threads, median of {repeats}\n")
    print(f"| variant | tokens / s | s per call | vs base (time) | ms per extra token ({short} -> {long}) "
          "| vs base (per token) |")
    print("|---|---:|---:|---:|---:|---:|")
    per_token = {name: (median[name, long] - median[name, short]) / (args.batch * (long - short))
                 for name in variants}
    for name in variants:
        t = median[name, short]
        print(f"| {name} | {args.batch * short / t:.1f} | {t:.2f} | {t / median['base', short]:.2f}x "
              f"| {1e3 * per_token[name]:.1f} | {per_token[name] / per_token['base']:.2f}x |")


if __name__ == "__main__":
    main()
