"""The side-by-side study behind ``simoe compare``: every method, the same data, steps and tokens.

Each run (a method with one seed) is trained with ``simoe train --method M --seed S`` and scored
with ``simoe eval sni``, each in its own process (so peak memory is the run's own and a crash stops
only that run), into ``output_dir/RUN/``. Its result is written to ``records/RUN.json`` (a folder
meant to be committed): scores, 95 % bootstrap intervals over instances (overall and per
category), the per-instance scores, the training record and, for routed methods, how the router
divides the test categories among the experts. A run whose record exists is not run again, so a
study fills in over several sessions, and ``--runs`` picks which runs to do now. The table
(between markers in the results Markdown file, text outside them kept) and the chart are made
from every record there is; runs not done yet are listed as pending.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from simoe.io import read_jsonl, save_json, save_text

BEGIN, END = "<!-- simoe compare: begin -->", "<!-- simoe compare: end -->"
KNOWN = {"model_name_or_path", "methods", "seeds", "reference", "output_dir", "records", "results",
         "train", "method_overrides", "eval"}
ROUTED = ("simoe", "smear")


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping")
    unknown = sorted(set(config) - KNOWN)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(KNOWN)}")
    for key in ("model_name_or_path", "methods", "output_dir", "train", "eval"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    from simoe.baselines import METHODS

    bad = [m for m in config["methods"] if m != "base" and m not in METHODS]
    if bad:
        raise ValueError(f"{path}: unknown method(s) {bad}; methods: base, {', '.join(METHODS)}")
    seeds = config.get("seeds", {})
    if not isinstance(seeds, dict) or any(m not in config["methods"] or m == "base" for m in seeds):
        raise ValueError(f"{path}: seeds must map trained methods of `methods` to lists of seeds")
    if config.get("reference") not in (None, *config["methods"]):
        raise ValueError(f"{path}: reference {config['reference']!r} is not one of the methods")
    from simoe.training.arguments import check_options_apply

    for method in config["methods"]:  # before any run starts, not when that method's turn comes
        if method != "base":
            check_options_apply(method, set(config["train"]), f"{path}: train")
            check_options_apply(method, set(config.get("method_overrides", {}).get(method, {})),
                                f"{path}: method_overrides.{method}")
    return config


def runs(config: dict) -> list[tuple[str, str, int | None]]:
    """(run name, method, seed) of every run of the study, in table order."""
    out = []
    for method in config["methods"]:
        if method == "base":
            out.append(("base", "base", None))
            continue
        for seed in config.get("seeds", {}).get(method, [config["train"].get("seed", 0)]):
            out.append((f"{method}-seed{seed}", method, int(seed)))
    return out


def _flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[3]} failed (exit {proc.returncode}); see {log}")


def _records_dir(config: dict) -> Path:
    return Path(config.get("records") or Path(config["output_dir"]) / "records")


def run_one(config: dict, name: str, method: str, seed: int | None) -> dict:
    """Train (unless ``base``), evaluate and record one run; return its record."""
    out = Path(config["output_dir"]) / name
    summary_path = out / "eval" / "summary.json"
    simoe = [sys.executable, "-m", "simoe.cli"]
    model = config["model_name_or_path"]
    if method != "base":
        model = str(out)
    if not summary_path.is_file():
        if method != "base":
            options = {**config["train"], **config.get("method_overrides", {}).get(method, {}), "seed": seed}
            _run([*simoe, "train", "--method", method, "--model_name_or_path", config["model_name_or_path"],
                  "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none", *_flags(options)],
                 out / "train.log")
        _run([*simoe, "eval", "sni", "--model", model, "--output_dir", str(out / "eval"),
              *_flags(config["eval"])], out / "eval.log")
    record = _score(config, out / "eval")
    record.update(run=name, method=method, seed=seed)
    if method == "base":
        from simoe.baselines import parameter_counts
        from simoe.hub import load_model_and_tokenizer

        counts = parameter_counts(load_model_and_tokenizer(config["model_name_or_path"])[0])
        record.update(trainable=0, inference_params=counts["active_per_token"])
    else:
        train = json.loads((out / "train_summary.json").read_text())
        logs = [h for h in train["log_history"] if "loss" in h or "nll" in h]
        record.update(trainable=train["parameters"]["trainable"],
                      inference_params=train["parameters"]["active_per_token"],
                      seconds_per_step=train["seconds_per_step"], peak_memory_mb=train["peak_memory_mb"],
                      data=train["data"], last_log=logs[-1] if logs else None)
        if "sparsity" in train:
            record["sparsity"] = train["sparsity"]
    if method in ROUTED:
        record["routing"] = routing_by_category(config, model)
    return record


def _score(config: dict, eval_dir: Path) -> dict:
    """Scores of an eval folder with 95 % bootstrap intervals, overall and per category."""
    from simoe.evaluation.metrics import bootstrap_interval, instance_scores

    predictions = {p["id"]: p["prediction"] for p in read_jsonl(eval_dir / "predictions.jsonl",
                                                                 ("id", "prediction"))}
    references = read_jsonl(eval_dir / "references.jsonl", ("id", "references", "task_category"))
    scores = instance_scores(predictions, references)
    by_category: dict[str, list[float]] = {}
    for s in scores:
        by_category.setdefault(s["category"], []).append(s["rougeL"])
    values = [s["rougeL"] for s in scores]
    return {
        "rougeL": sum(values) / len(values), "rougeL_ci95": bootstrap_interval(values),
        "exact_match": sum(s["exact_match"] for s in scores) / len(scores),
        "per_category": {c: {"rougeL": sum(v) / len(v), "ci95": bootstrap_interval(v), "instances": len(v)}
                         for c, v in sorted(by_category.items())},
        "instances": scores,
    }


def routing_by_category(config: dict, model_dir: str) -> dict:
    """Load a routed run and measure how its router divides the evaluated SNI prompts: expert load
    and NMI between the top expert and the prompt's category (and task)."""
    from simoe.analysis.compute import mean_by_group, routing_by_record, routing_specialisation
    from simoe.data import load_sni_tasks, sni_prompt
    from simoe.evaluation.metrics import category_key
    from simoe.inference.loading import load_for_inference

    model, tokenizer = load_for_inference(model_dir)
    e = config["eval"]
    tasks = load_sni_tasks(e["data"], e.get("split", "test"), e.get("max_instances"))
    records = [{"messages": [{"role": "user", "content": sni_prompt(t.data, inst)},
                             {"role": "assistant", "content": ""}], "group": t.name, "category": t.category}
               for t in tasks for inst in t.instances]
    groups, routing = routing_by_record(model, tokenizer, records, batch_size=8)
    categories = [category_key(r["category"]) for r in records]
    by_category = routing_specialisation(categories, routing)
    return {**by_category, "nmi_task": routing_specialisation(groups, routing)["nmi"],
            "mean_by_category": dict(sorted(mean_by_group(categories, routing).items()))}


def paired_difference(record: dict, reference: dict) -> tuple[float, tuple[float, float]]:
    """Mean ROUGE-L difference to ``reference`` over the instances both scored, with its 95 %
    paired bootstrap interval (the same instances resampled for both)."""
    from simoe.evaluation.metrics import bootstrap_interval

    ref = {s["id"]: s["rougeL"] for s in reference["instances"]}
    diffs = [s["rougeL"] - ref[s["id"]] for s in record["instances"] if s["id"] in ref]
    return sum(diffs) / len(diffs), bootstrap_interval(diffs)


def run_compare(config_path: str, only: list[str] | None = None, table_only: bool = False) -> list[dict]:
    """Run the study's missing runs (or only those named; none with ``table_only``), then write the
    table and chart from every record there is."""
    config = load_config(config_path)
    records_dir = _records_dir(config)
    planned = runs(config)
    unknown = sorted(set(only or []) - {name for name, _, _ in planned})
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; runs: {', '.join(n for n, _, _ in planned)}")
    records_dir.mkdir(parents=True, exist_ok=True)
    for name, method, seed in planned:
        path = records_dir / f"{name}.json"
        if table_only or path.is_file() or (only and name not in only):
            continue
        start = time.time()
        record = run_one(config, name, method, seed)
        save_json(record, path)
        print(f"{name}: ROUGE-L {record['rougeL']:.2f} ({time.time() - start:.0f} s)", flush=True)
    rows = [json.loads((records_dir / f"{n}.json").read_text()) for n, _, _ in planned
            if (records_dir / f"{n}.json").is_file()]
    pending = [n for n, _, _ in planned if not (records_dir / f"{n}.json").is_file()]
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        plot_results(rows, out / "results.png")
        if config.get("results"):
            md = Path(config["results"])
            md.parent.mkdir(parents=True, exist_ok=True)
            plot_results(rows, md.with_suffix(".png"))  # beside the Markdown that shows it
            write_markdown(rows, pending, config, config_path, md, md.with_suffix(".png"))
    return rows


def plot_results(rows: list[dict], path: Path) -> None:
    """Overall ROUGE-L with its 95 % interval per run, and ROUGE-L per category, as bars."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r["run"] for r in rows]
    categories = sorted({c for r in rows for c in r["per_category"]})
    fig = Figure(figsize=(14, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1, 3])
    x = np.arange(len(rows))
    means = np.array([r["rougeL"] for r in rows])
    lo, hi = np.array([r["rougeL_ci95"] for r in rows]).T
    colors = [f"C{i}" for i in range(len(rows))]
    left.bar(x, means, 0.6, yerr=[means - lo, hi - means], capsize=4, color=colors)
    left.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    left.set_ylabel("ROUGE-L (0-100)")
    left.set_title("Overall, with 95 % bootstrap interval")
    left.set_ylim(0, 1.15 * max(hi) + 1e-9)
    width = 0.8 / len(rows)
    xc = np.arange(len(categories))
    for i, r in enumerate(rows):
        heights = [r["per_category"].get(c, {}).get("rougeL", 0) for c in categories]
        right.bar(xc + (i - (len(rows) - 1) / 2) * width, heights, width, label=r["run"], color=colors[i])
    right.set_xticks(xc, [c.replace("_", " ") for c in categories], rotation=35, ha="right", fontsize=8)
    right.set_ylabel("ROUGE-L")
    right.set_title("ROUGE-L per task category")
    top = max([v["rougeL"] for r in rows for v in r["per_category"].values()] + [1e-9])
    right.set_ylim(0, 1.3 * top)
    right.legend(fontsize=8, ncols=4, loc="upper left")
    fig.savefig(path, dpi=120)


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def write_markdown(rows: list[dict], pending: list[str], config: dict, config_path: str, path: Path,
                   png: Path) -> None:
    reference = next((r for r in rows if r["method"] == config.get("reference")), None)
    ref_name = reference["run"] if reference else None
    lines = [BEGIN, "", f"Config: `{config_path}` · base `{config['model_name_or_path']}` · "
             f"`simoe compare --config {config_path}` · records in `{_records_dir(config)}`", "",
             f"| run | ROUGE-L [95 % CI] | Δ vs {ref_name or '–'} [95 % CI] | exact match | trainable params "
             "| inference params / token | s / step | peak memory (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        step = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "–"
        mem = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "–"
        delta = "–"
        if reference is not None and r is not reference:
            d, ci = paired_difference(r, reference)
            delta = f"{d:+.2f} {_interval(ci)}"
        lines.append(f"| {r['run']} | {r['rougeL']:.2f} {_interval(r['rougeL_ci95'])} | {delta} | "
                     f"{r['exact_match']:.2f} | {r['trainable']:,} | {r['inference_params']:,} | {step} "
                     f"| {mem} |")
    if pending:
        lines += ["", "Pending (no record yet): " + ", ".join(f"`{p}`" for p in pending) + "."]
    categories = sorted({c for r in rows for c in r["per_category"]})
    lines += ["", "ROUGE-L per category [95 % CI]:", "",
              "| category | " + " | ".join(r["run"] for r in rows) + " |", "| --- |" + " ---: |" * len(rows)]
    for c in categories:
        cells = []
        for r in rows:
            v = r["per_category"].get(c)
            cells.append(f"{v['rougeL']:.1f} {_interval(v['ci95'])}" if v else "–")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    routed = [r for r in rows if "routing" in r]
    if routed:
        lines += ["", "Routing on the evaluated prompts (top expert per prompt):", "",
                  "| run | NMI(category; expert) | NMI(task; expert) | expert load | union density "
                  "(eval gates) |", "| --- | ---: | ---: | --- | ---: |"]
        for r in routed:
            density = (f"{r['sparsity']['union']['deterministic_density']:.3f}" if "sparsity" in r else "–")
            load = " ".join(f"{x:.2f}" for x in r["routing"]["load"])
            lines.append(f"| {r['run']} | {r['routing']['nmi']:.2f} | {r['routing']['nmi_task']:.2f} | "
                         f"{load} | {density} |")
    rel = os.path.relpath(png, path.parent)
    lines += ["", f"![results]({rel})", "", END]
    block = "\n".join(lines)
    text = path.read_text() if path.is_file() else "# Results\n\n" + BEGIN + END + "\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    save_text(text, path)
