"""The side-by-side study behind ``simoe compare``: every method, the same data, seed, steps and tokens.

Each method is trained with ``simoe train --method M`` and scored with ``simoe eval sni``, each in
its own process (so peak memory is the method's own and a crash stops only that method), into
``output_dir/M/``. A method whose ``eval/summary.json`` exists is not run again, so an interrupted
study resumes where it stopped. The results go to ``output_dir/results.json``, a bar chart and a
table between markers in the results Markdown file (text outside the markers is kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

BEGIN, END = "<!-- simoe compare: begin -->", "<!-- simoe compare: end -->"
KNOWN = {"model_name_or_path", "methods", "output_dir", "results", "train", "method_overrides", "eval"}


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
    return config


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


def run_method(config: dict, method: str) -> dict:
    """Train (unless ``base``) and evaluate one method; return its row of the results."""
    out = Path(config["output_dir"]) / method
    summary_path = out / "eval" / "summary.json"
    simoe = [sys.executable, "-m", "simoe.cli"]
    model = config["model_name_or_path"]
    if not summary_path.is_file():
        if method != "base":
            options = {**config["train"], **config.get("method_overrides", {}).get(method, {})}
            _run([*simoe, "train", "--method", method, "--model_name_or_path", model,
                  "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none", *_flags(options)],
                 out / "train.log")
            model = str(out)
        _run([*simoe, "eval", "sni", "--model", model, "--output_dir", str(out / "eval"),
              *_flags(config["eval"])], out / "eval.log")
    scores = json.loads(summary_path.read_text())
    row = {"method": method, "rougeL": scores["rougeL"], "exact_match": scores["exact_match"],
           "per_category": {k: v["rougeL"] for k, v in scores["per_category"].items()}}
    if method == "base":
        from simoe.baselines import parameter_counts
        from simoe.hub import load_model_and_tokenizer

        counts = parameter_counts(load_model_and_tokenizer(config["model_name_or_path"])[0])
        row.update(trainable=0, inference_params=counts["active_per_token"])
    else:
        train = json.loads((out / "train_summary.json").read_text())
        row.update(trainable=train["parameters"]["trainable"],
                   inference_params=train["parameters"]["active_per_token"],
                   seconds_per_step=train["seconds_per_step"], peak_memory_mb=train["peak_memory_mb"])
    return row


def run_compare(config_path: str) -> list[dict]:
    config = load_config(config_path)
    rows = []
    for method in config["methods"]:
        start = time.time()
        rows.append(run_method(config, method))
        print(f"{method}: ROUGE-L {rows[-1]['rougeL']:.2f} ({time.time() - start:.0f} s)", flush=True)
    out = Path(config["output_dir"])
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot_results(rows, out / "results.png")
    if config.get("results"):
        md = Path(config["results"])
        md.parent.mkdir(parents=True, exist_ok=True)
        plot_results(rows, md.with_suffix(".png"))  # beside the Markdown that shows it
        write_markdown(rows, config, config_path, md, md.with_suffix(".png"))
    return rows


def plot_results(rows: list[dict], path: Path) -> None:
    """Overall ROUGE-L and exact match per method, and ROUGE-L per category, as bars."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [r["method"] for r in rows]
    categories = sorted({c for r in rows for c in r["per_category"]})
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1, 3])
    x = np.arange(len(methods))
    left.bar(x - 0.2, [r["rougeL"] for r in rows], 0.4, label="ROUGE-L")
    left.bar(x + 0.2, [r["exact_match"] for r in rows], 0.4, label="exact match")
    left.set_xticks(x, methods, rotation=30, ha="right")
    left.set_ylabel("score (0-100)")
    left.set_title("Overall (SNI test tasks)")
    left.set_ylim(0, 1.3 * max(max(r["rougeL"], r["exact_match"]) for r in rows) + 1e-9)  # legend room
    left.legend(loc="upper left", fontsize=8)
    width = 0.8 / len(methods)
    xc = np.arange(len(categories))
    for i, r in enumerate(rows):
        heights = [r["per_category"].get(c, 0) for c in categories]
        right.bar(xc + (i - (len(methods) - 1) / 2) * width, heights, width, label=r["method"])
    right.set_xticks(xc, [c.replace("_", " ") for c in categories], rotation=35, ha="right", fontsize=8)
    right.set_ylabel("ROUGE-L")
    right.set_title("ROUGE-L per task category")
    right.set_ylim(0, 1.25 * max([v for r in rows for v in r["per_category"].values()] + [1e-9]))
    right.legend(fontsize=8, ncols=3)
    fig.savefig(path, dpi=120)


def write_markdown(rows: list[dict], config: dict, config_path: str, path: Path, png: Path) -> None:
    lines = [BEGIN, "", f"Config: `{config_path}` · base `{config['model_name_or_path']}` · "
             f"`simoe compare --config {config_path}`", "",
             "| method | ROUGE-L | exact match | trainable params | inference params / token | s / step | "
             "peak memory (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        step = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "–"
        mem = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "–"
        lines.append(f"| {r['method']} | {r['rougeL']:.2f} | {r['exact_match']:.2f} | {r['trainable']:,} | "
                     f"{r['inference_params']:,} | {step} | {mem} |")
    categories = sorted({c for r in rows for c in r["per_category"]})
    lines += ["", "ROUGE-L per category:", "",
              "| category | " + " | ".join(r["method"] for r in rows) + " |",
              "| --- |" + " ---: |" * len(rows)]
    for c in categories:
        lines.append(f"| {c} | " + " | ".join(f"{r['per_category'].get(c, 0):.2f}" for r in rows) + " |")
    rel = os.path.relpath(png, path.parent)
    lines += ["", f"![results]({rel})", "", END]
    block = "\n".join(lines)
    text = path.read_text() if path.is_file() else "# Results\n\n" + BEGIN + END + "\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)
