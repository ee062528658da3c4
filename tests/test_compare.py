"""`simoe compare`: every method trained and scored alike, results written, finished methods not re-run."""

import json

import yaml
from conftest import SHARED_DATA
from test_configs import tiny_dir  # noqa: F401  (fixture)

from simoe.cli import main

TASK = "task1394_meta_woz_task_classification"


def test_compare_runs_each_method_once_and_writes_the_study(tiny_dir, tmp_path):  # noqa: F811
    config = {
        "model_name_or_path": tiny_dir,
        "methods": ["base", "lora", "simoe"],
        "output_dir": str(tmp_path / "study"),
        "results": str(tmp_path / "docs" / "results.md"),
        "train": {"data": str(SHARED_DATA / "sni"), "data_format": "sni", "split": "train",
                  "max_instances_per_task": 1, "max_seq_length": 128, "max_steps": 2,
                  "per_device_train_batch_size": 2, "num_experts": 2, "target_sparsity": 0.5,
                  "use_cpu": True},
        "method_overrides": {"lora": {"learning_rate": 1.0e-3}},
        "eval": {"data": str(SHARED_DATA / "sni"), "split": "test", "tasks": TASK, "max_instances": 2,
                 "max_new_tokens": 4},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["compare", "--config", str(path)])

    rows = json.loads((tmp_path / "study" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "lora", "simoe"]
    for row in rows:  # each row is the method's own eval summary and training record
        summary = json.loads((tmp_path / "study" / row["method"] / "eval" / "summary.json").read_text())
        assert row["rougeL"] == summary["rougeL"] and summary["instances"] == 2
    lora, simoe = rows[1], rows[2]
    assert 0 < lora["trainable"] < simoe["trainable"] and lora["seconds_per_step"] > 0
    assert simoe["peak_memory_mb"] > 0 and rows[0]["trainable"] == 0
    # identical prompts for every method
    prompts = [[json.loads(line)["prompt"] for line in
                (tmp_path / "study" / m / "eval" / "predictions.jsonl").read_text().splitlines()]
               for m in ("base", "lora", "simoe")]
    assert prompts[0] == prompts[1] == prompts[2]
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "| simoe |" in md and (tmp_path / "docs" / "results.png").stat().st_size > 0

    # resumable: a finished method is not run again, and text outside the markers is kept
    (tmp_path / "docs" / "results.md").write_text("# Results\n\nMy reading.\n\n" + md[md.index("<!--"):])

    def stamps():
        study = tmp_path / "study"
        return {m: (study / m / "eval" / "summary.json").stat().st_mtime_ns for m in ("lora", "simoe")}

    before = stamps()
    main(["compare", "--config", str(path)])
    assert stamps() == before
    assert "My reading." in (tmp_path / "docs" / "results.md").read_text()


def test_shipped_study_config_is_valid():
    from pathlib import Path

    from simoe.compare import load_config

    for path in sorted((Path(__file__).parents[1] / "configs").glob("compare_*.yaml")):
        config = load_config(str(path))
        assert config["methods"][0] == "base" and "simoe" in config["methods"]
