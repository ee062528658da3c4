"""Quickstart: upcycle a causal LM with SIMoE and train it on two toy tasks, on a CPU, in a minute.

The base is a tiny Llama built from a config (no download); with a real model, pass any
`AutoModelForCausalLM` instead. Two tasks share one prompt format but need different skills:
reverse a sequence of digit tokens, or sort it. The SIMoE objective is trained as the spec
writes it: NLL + a Lagrangian sparsity constraint on the union of experts + orthogonality.

    python examples/quickstart.py [--steps 600] [--output_dir out/quickstart]
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from simoe import SIMoEConfig, SIMoEModel, objectives, upcycle

PAD, SEP, TASKS, DIGITS = 0, 1, {"reverse": 2, "sort": 3}, range(10, 20)
LENGTH = 6


def make_example(task: str, g: torch.Generator) -> tuple[list[int], list[int]]:
    digits = (torch.randint(len(DIGITS), (LENGTH,), generator=g) + DIGITS.start).tolist()
    answer = digits[::-1] if task == "reverse" else sorted(digits)
    return [TASKS[task], *digits, SEP], answer


def make_batch(task_names: list[str], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the response only and the prompt marked for routing."""
    rows = [make_example(t, g) for t in task_names]
    ids = torch.tensor([p + a for p, a in rows])
    labels = ids.clone()
    labels[:, : len(rows[0][0])] = -100
    return {"input_ids": ids, "labels": labels, "prompt_mask": (labels == -100).long()}


@torch.no_grad()
def exact_match(model: SIMoEModel, task: str, n: int = 64) -> float:
    g = torch.Generator().manual_seed(1234)
    prompts, answers = zip(*(make_example(task, g) for _ in range(n)), strict=True)
    out = model.generate(input_ids=torch.tensor(prompts), max_new_tokens=LENGTH, do_sample=False,
                         pad_token_id=PAD)
    return (out[:, len(prompts[0]):] == torch.tensor(answers)).all(-1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--output_dir", default="out/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)

    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
        bos_token_id=None, eos_token_id=None))
    config = SIMoEConfig(num_experts=4, target_sparsity=0.5)
    model = upcycle(base, config)  # the base is frozen; Δ = 0, so this is still the base model
    model.eval()
    print(f"upcycled {sum(1 for _ in model.simoe_layers())} modules; before training exact match:",
          {t: exact_match(model, t) for t in TASKS})

    lagrangian = objectives.SparsityLagrangian.for_config(config)
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW([
        {"params": groups["delta"], "lr": 3e-3},
        {"params": groups["mask_logits"], "lr": 5e-2, "weight_decay": 0.0},
        {"params": groups["router"], "lr": 3e-3},
        {"params": lagrangian.parameters(), "lr": 2e-1, "weight_decay": 0.0},
    ], weight_decay=0.0)
    warmup = args.steps // 3
    g = torch.Generator().manual_seed(0)
    layers = [layer for _, layer in model.simoe_layers()]
    model.train()
    bar = tqdm(range(args.steps), desc="training")
    for step in bar:
        # anneal the router temperature τ0 -> τ_min and warm the density target up from 1.0
        frac = step / max(1, args.steps - 1)
        model.set_router_temperature(config.router_temperature
                                     + frac * (config.router_min_temperature - config.router_temperature))
        target = objectives.target_density(step, warmup, config.target_density)
        batch = make_batch([list(TASKS)[i % 2] for i in range(16)], g)
        nll = model(**batch).loss
        density = objectives.constrained_density(layers, config.sparsity_scope)
        orth = objectives.orthogonality(layers)
        loss = nll + lagrangian(density, target) + config.orthogonality_weight * orth
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_mask_logits_()
        bar.set_postfix(nll=f"{nll.item():.3f}", density=f"{density.max().item():.3f}",
                        target=f"{target:.2f}")

    model.eval()
    print("after training exact match:", {t: exact_match(model, t) for t in TASKS})
    for task in TASKS:
        batch = make_batch([task] * 64, torch.Generator().manual_seed(7))
        r = model.route(batch["input_ids"], prompt_mask=batch["prompt_mask"]).mean(0)
        print(f"mean routing for {task:8s}", [round(x, 3) for x in r.tolist()])
    report = model.sparsity_report()
    print("sparsity report:", json.dumps(report["union"]), "target density", report["target_density"])
    model.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
