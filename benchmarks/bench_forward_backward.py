"""Wall time of SIMoE against full fine-tuning and PEFT LoRA, on CPU in fp32.

(a) forward + backward of one linear layer, (b) one training step (forward, backward, AdamW) of a
tiny Llama built from a config. Prints markdown tables: median time over repeats after warm-up,
ratios to full fine-tuning and to LoRA, and trainable parameter counts.

    python benchmarks/bench_forward_backward.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from simoe import SIMoEConfig, objectives, upcycle
from simoe.layer import SIMoELinear

LORA_RANK = 16
QUICK = dict(warmup=2, repeats=10, model_repeats=5, d_in=512, d_out=512, batch=4, seq=128,
             hidden=128, intermediate=344, layers=2, model_batch=4, model_seq=64)


class OneLinear(nn.Module):
    """A module holding one linear layer, for peft to wrap."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def num_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def time_steps(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call; variants are interleaved so that drift hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward (deterministic)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad) and not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


def print_table(title: str, times: dict[str, list[float]], counts: dict[str, int],
                saved: dict[str, int] | None = None) -> None:
    median = {name: statistics.median(t) for name, t in times.items()}
    full, lora = median["full FT"], median["LoRA r=16"]
    extra = " saved activations MiB |" if saved else ""
    print(f"\n{title}\n")
    print(f"| variant | trainable params | median ms | min ms | vs full FT | vs LoRA |{extra}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if saved else ""))
    for name, t in median.items():
        cell = f" {saved[name] / 2**20:.1f} |" if saved else ""
        print(f"| {name} | {counts[name]:,} | {t * 1e3:.1f} | {min(times[name]) * 1e3:.1f} "
              f"| {t / full:.2f}x | {t / lora:.2f}x |{cell}")


@torch.no_grad()
def switch_off_columns(layer: SIMoELinear, fraction: float, seed: int = 0) -> None:
    """Gate a random ``fraction`` of input columns off in every expert: a trained model's state."""
    g = torch.Generator().manual_seed(seed)
    off = torch.randperm(layer.in_features, generator=g)[: round(fraction * layer.in_features)]
    layer.log_alpha[:, off] = -10.0


def bench_layer(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    batch, seq, d_in, d_out, m = args.batch, args.seq, args.d_in, args.d_out, args.experts
    base = nn.Linear(d_in, d_out)
    x = torch.randn(batch, seq, d_in, requires_grad=True)
    grad_out = torch.randn(batch, seq, d_out)

    full = copy.deepcopy(base)
    lora = get_peft_model(OneLinear(copy.deepcopy(base)),
                          LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["linear"]))
    dense = SIMoELinear(copy.deepcopy(base).requires_grad_(False), m, init_logit=3.0, init_std=0.1)
    sparse = copy.deepcopy(dense)
    with torch.no_grad():
        dense.delta.normal_(std=0.02)  # as after some training: every gradient path is non-zero
        sparse.delta.copy_(dense.delta)
        switch_off_columns(sparse, 1.0 - args.density)
    router_logits = torch.randn(batch, m, requires_grad=True)  # stands in for the router's output

    def run(module: nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> Callable[[], None]:
        tensors = [x, *trainable(module), *extra]

        def step() -> None:
            for t in tensors:
                t.grad = None
            if isinstance(module, SIMoELinear):
                module.set_routing(torch.softmax(router_logits, dim=-1))  # samples the gates
            module(x).backward(grad_out)

        return step

    names = {"full FT": full, "LoRA r=16": lora, f"SIMoE M={m}": dense,
             f"SIMoE M={m}, {args.density:.0%} dense": sparse}
    steps = {name: run(module, (router_logits,) if isinstance(module, SIMoELinear) else ())
             for name, module in names.items()}
    times = time_steps(steps, args.warmup, args.repeats)
    counts = {name: num_params(trainable(module)) for name, module in names.items()}
    print_table(f"### (a) one linear layer {d_in} -> {d_out}, x [{batch}, {seq}, {d_in}]: "
                "forward + backward", times, counts)


def tiny_llama(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)  # the same base weights for every variant
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.model_seq, 128), pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def bench_model(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, args.vocab, (args.model_batch, args.model_seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
    steps: dict[str, Callable[[], None]] = {}
    counts: dict[str, int] = {}
    losses: dict[str, Callable[[], torch.Tensor]] = {}

    def add(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            loss_fn: Callable[[], torch.Tensor], after: Callable[[], None] = lambda: None) -> None:
        model.train()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
            after()

        steps[name] = step
        losses[name] = loss_fn
        counts[name] = sum(num_params(g["params"]) for g in optimizer.param_groups)

    full = tiny_llama(args)
    base_params = num_params(full.parameters())
    add("full FT", full, torch.optim.AdamW(full.parameters(), lr=1e-4), lambda: full(**batch).loss)

    lora = get_peft_model(tiny_llama(args), LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    add("LoRA r=16", lora, torch.optim.AdamW(trainable(lora), lr=1e-4), lambda: lora(**batch).loss)

    for density in (1.0, args.density):
        config = SIMoEConfig(num_experts=args.experts)
        simoe = upcycle(tiny_llama(args), config)
        if density < 1.0:
            for _, layer in simoe.routed_layers():
                if isinstance(layer, SIMoELinear):
                    switch_off_columns(layer, 1.0 - density)
        regularizer = objectives.SIMoERegularizer(config, warmup_steps=0)  # what SIMoETrainer adds
        groups = simoe.parameter_groups()
        optimizer = torch.optim.AdamW(
            [{"params": groups["delta"], "lr": 1e-4}, {"params": groups["mask_logits"], "lr": 1e-2},
             {"params": groups["router"], "lr": 1e-3},
             {"params": list(regularizer.parameters()), "lr": 1e-2}]
        )

        def simoe_loss(simoe=simoe, regularizer=regularizer) -> torch.Tensor:
            return simoe(**batch).loss + regularizer(simoe.routed_layers(), step=0)[0]

        name = f"SIMoE M={args.experts}" + ("" if density == 1.0 else f", {density:.0%} dense")
        add(name, simoe, optimizer, simoe_loss, simoe.clamp_mask_logits_)

    times = time_steps(steps, args.warmup, args.model_repeats)
    saved = {name: saved_activation_bytes(loss_fn) for name, loss_fn in losses.items()}
    print_table(
        f"### (b) tiny Llama ({base_params:,} params: hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}), batch [{args.model_batch}, {args.model_seq}]: forward + backward + AdamW",
        times, counts, saved,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 1 min)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.25,
                        help="share of input columns left on in every expert for the sparse SIMoE rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats of (a)")
    parser.add_argument("--model-repeats", type=int, default=20, help="timed repeats of (b)")
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-seq", type=int, default=128)
    if parser.parse_known_args()[0].quick:  # smaller defaults; explicit flags still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; "
          f"median of {args.repeats} (a) / {args.model_repeats} (b) repeats after {args.warmup} warm-up")
    bench_layer(args)
    bench_model(args)


if __name__ == "__main__":
    main()
