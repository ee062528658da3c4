"""The main job (`make demo`): upcycle SmolLM2-135M-Instruct with SIMoE on 2 CPU cores and show it learn.

1. Generate the project's multi-domain instruction set (simoe.data.synthetic): task families with
   exact answers; some families are held out of training.
2. Score the base model (exact match per family) on held-out test prompts of every family.
3. Train SIMoE with `configs/demo.yaml` (M = 8 experts, 75 % sparsity, a progress bar).
4. Score the trained model on the same prompts, print both side by side with the sparsity report,
   the gate-consistency gap (response NLL with evaluation minus training gates), how the router
   divides the families among the experts (load, NMI), and sample generations; save the
   checkpoint, results.json and a routing heatmap (PNG).

    python -m simoe.recipes.demo [--config configs/demo.yaml] [any `simoe train` option, e.g. --max_steps 50]

Run from the repository root (the default config is ``configs/demo.yaml`` there).
"""

from __future__ import annotations

import os
import sys
import time

import datasets

from simoe.analysis.compute import mean_by_group, routing_by_record, routing_specialisation
from simoe.analysis.plots import plot_routing_heatmap
from simoe.data import synthetic, tokenize_record
from simoe.evaluation.families import exact_match_by_group, split_record
from simoe.evaluation.perplexity import gate_gap
from simoe.hub import load_model_and_tokenizer
from simoe.inference.generation import generate
from simoe.io import load_json_object, save_json
from simoe.recipes.train import run_train
from simoe.training.arguments import parse_train_args

DEFAULT_CONFIG = os.path.join("configs", "demo.yaml")
EVAL_PER_FAMILY = 24
MAX_NEW_TOKENS = 16


def main(argv: list[str]) -> None:
    if "--config" not in argv:
        if not os.path.isfile(DEFAULT_CONFIG):
            raise SystemExit(f"{DEFAULT_CONFIG} not found: run from the repository root, or pass --config")
        argv = ["--config", DEFAULT_CONFIG, *argv]
    model_args, data_args, config, training_args = parse_train_args(argv)
    start = time.time()
    seen = synthetic.make_records("test", seed=1, n_per_family=EVAL_PER_FAMILY)
    held_out = synthetic.make_records("heldout", seed=1, n_per_family=EVAL_PER_FAMILY)
    evaluation = seen + held_out
    score = dict(max_new_tokens=MAX_NEW_TOKENS, batch_size=24)

    print(f"== base model {model_args.model_name_or_path}: zero-shot exact match on "
          f"{len(evaluation)} test prompts")
    base, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, dtype=model_args.dtype)
    # the base's scores depend only on the model and the prompts: kept beside the run, reused by a rerun
    cache = os.path.join(training_args.output_dir, "base_exact_match.json")
    key = {"model": model_args.model_name_or_path, "prompts": len(evaluation), "score": score}
    cached = load_json_object(cache) if os.path.isfile(cache) else {}
    if cached.get("key") == key:
        base_em = cached["exact_match"]
    else:
        base_em = exact_match_by_group(base, tokenizer, evaluation, **score)
        os.makedirs(training_args.output_dir, exist_ok=True)
        save_json({"key": key, "exact_match": base_em}, cache)
    del base

    print(f"== training SIMoE ({config.num_experts} experts, target sparsity {config.target_sparsity:.0%})")
    trainer = run_train(model_args, data_args, config, training_args)
    model = trainer.model.eval()
    simoe_em = exact_match_by_group(model, tokenizer, evaluation, **score)

    print("\n== exact match per family (test prompts never seen in training)")
    print(f"{'family':16s} {'split':9s} {'base':>6s} {'SIMoE':>6s}")
    for family in base_em:
        split = "held-out" if family in synthetic.HELD_OUT else "seen"
        print(f"{family:16s} {split:9s} {base_em[family]:6.2f} {simoe_em[family]:6.2f}")
    for split, names in (("seen", [f for f in base_em if f not in synthetic.HELD_OUT]),
                         ("held-out", list(synthetic.HELD_OUT))):
        b = sum(base_em[f] for f in names) / len(names)
        s = sum(simoe_em[f] for f in names) / len(names)
        print(f"{'mean':16s} {split:9s} {b:6.2f} {s:6.2f}")

    report = model.sparsity_report()
    union = report["union"]
    print(f"\n== sparsity: {report['upcycled_modules']} upcycled modules, {report['upcycled_params']:,} "
          f"upcycled parameters; union of experts non-zero (evaluation gates): "
          f"{union['deterministic_density']:.1%} (expected {union['expected_density']:.1%}, "
          f"target {report['target_density']:.0%})")
    print("   non-zero per expert: " + ", ".join(f"{e['deterministic_density']:.1%}"
                                               for e in report["experts"]))

    rows = [tokenize_record(r, tokenizer, data_args.max_seq_length) for r in seen]
    gap = gate_gap(model, tokenizer, datasets.Dataset.from_list([r for r in rows if r is not None]))
    print(f"\n== gate consistency on {len(seen)} test prompts of the seen families: response NLL "
          f"{gap['eval_gate_nll']:.4f} with the evaluation gates, {gap['train_gate_nll']:.4f} with the "
          f"training gates (gap {gap['gap']:+.4f})")

    groups, routing = routing_by_record(model, tokenizer, evaluation)
    mean_routing = mean_by_group(groups, routing)
    special = routing_specialisation(groups, routing)
    print(f"== routing: load per expert {', '.join(f'{x:.0%}' for x in special['load'])} "
          f"(least {min(special['load']):.1%}); NMI(family; top expert) {special['nmi']:.2f}")

    print("\n== sample generations (SIMoE)")
    samples = [next(r for r in evaluation if r["group"] == f) for f in simoe_em]
    answers = generate(model, tokenizer, [split_record(r, i)[0] for i, r in enumerate(samples)],
                       max_new_tokens=MAX_NEW_TOKENS)
    for record, answer in zip(samples, answers, strict=True):
        prompt, reference = split_record(record, 0)
        print(f"   [{record['group']}] {prompt[-1]['content']!r}\n"
              f"      -> {answer!r} (reference {reference!r})")

    out = training_args.output_dir
    png = os.path.join(out, "routing_heatmap.png")
    labels = {f"{f} (held out)" if f in synthetic.HELD_OUT else f: r for f, r in mean_routing.items()}
    plot_routing_heatmap(labels, png, title="SIMoE demo: mean routing per task family")
    results = {"base_exact_match": base_em, "simoe_exact_match": simoe_em,
               "held_out": synthetic.HELD_OUT, "sparsity": report, "gate_gap": gap,
               "routing": special, "mean_routing": mean_routing, "seconds": time.time() - start}
    save_json(results, os.path.join(out, "results.json"))
    print(f"\nsaved the SIMoE checkpoint, results.json and {os.path.basename(png)} to {out} "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
