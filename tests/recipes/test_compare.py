"""`simoe compare`: every method trained and scored alike, results written, finished methods not re-run."""

import json

import pytest
import torch
import yaml
from conftest import SHARED_DATA
from safetensors.torch import load_file

from simoe.cli import main
from simoe.recipes import compare

TASK = "task1394_meta_woz_task_classification"


@pytest.mark.slow
def test_compare_runs_each_method_once_and_writes_the_study(tiny_dir, tmp_path):
    config = {
        "model_name_or_path": tiny_dir,
        "methods": ["base", "lora", "simoe"],
        "output_dir": str(tmp_path / "study"),
        "results": str(tmp_path / "docs" / "results.md"),
        "train": {"data": str(SHARED_DATA / "sni"), "data_format": "sni", "split": "train",
                  "max_instances_per_task": 1, "max_seq_length": 128, "max_steps": 2,
                  "per_device_train_batch_size": 2, "use_cpu": True},
        "method_overrides": {"lora": {"learning_rate": 1.0e-3},
                             "simoe": {"num_experts": 2, "target_sparsity": 0.5}},
        "eval": {"data": str(SHARED_DATA / "sni"), "split": "test", "tasks": TASK, "max_instances": 2,
                 "max_new_tokens": 4},
    }
    config["seeds"] = {"simoe": [0, 1]}
    config["reference"] = "lora"
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["compare", "--config", str(path), "--runs", "base", "lora-seed0"])  # part of the study now
    records = tmp_path / "study" / "records"
    assert sorted(p.name for p in records.iterdir()) == ["base.json", "lora-seed0.json"]
    pending = "Pending (no record yet): `simoe-seed0`, `simoe-seed1`"
    assert pending in (tmp_path / "docs" / "results.md").read_text()
    main(["compare", "--config", str(path)])  # the rest

    runs = ["base", "lora-seed0", "simoe-seed0", "simoe-seed1"]
    rows = [json.loads((records / f"{r}.json").read_text()) for r in runs]
    for row in rows:  # each record holds the run's official summary, its intervals and instances
        summary = json.loads((tmp_path / "study" / row["run"] / "eval" / "summary.json").read_text())
        assert row["rougeL"] == pytest.approx(summary["rougeL"], abs=1e-3) and len(row["instances"]) == 2
        assert row["rougeL_ci95"][0] <= row["rougeL"] <= row["rougeL_ci95"][1]
    lora, simoe = rows[1], rows[2]
    assert 0 < lora["trainable"] < simoe["trainable"] and lora["seconds_per_step"] > 0
    assert simoe["peak_memory_mb"] > 0 and rows[0]["trainable"] == 0
    assert "routing" in simoe and "routing" not in lora and simoe["sparsity"]["num_experts"] == 2
    assert compare.paired_difference(lora, lora) == (0.0, (0.0, 0.0))
    # each seed trained its own model
    weights = [load_file(tmp_path / "study" / r / "simoe_model.safetensors") for r in runs[2:]]
    assert not torch.equal(weights[0]["router.net.1.weight"], weights[1]["router.net.1.weight"])
    # identical prompts for every method
    prompts = [[json.loads(line)["prompt"] for line in
                (tmp_path / "study" / r / "eval" / "predictions.jsonl").read_text().splitlines()]
               for r in runs]
    assert prompts[0] == prompts[1] == prompts[2]
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "| simoe-seed1 |" in md and "Pending" not in md
    assert (tmp_path / "docs" / "results.png").stat().st_size > 0

    # resumable: a run with a record is not run again, and text outside the markers is kept
    (tmp_path / "docs" / "results.md").write_text("# Results\n\nMy reading.\n\n" + md[md.index("<!--"):])

    def stamps():
        return {r: (records / f"{r}.json").stat().st_mtime_ns for r in runs}

    before = stamps()
    main(["compare", "--config", str(path)])
    assert stamps() == before
    (records / "simoe-seed1.json").unlink()
    main(["compare", "--config", str(path), "--table_only"])  # runs nothing, lists it as pending
    assert not (records / "simoe-seed1.json").exists()
    assert "Pending (no record yet): `simoe-seed1`" in (tmp_path / "docs" / "results.md").read_text()
    assert "My reading." in (tmp_path / "docs" / "results.md").read_text()


def test_shipped_study_config_is_valid():
    from pathlib import Path

    from simoe.recipes.compare import load_config

    for path in sorted((Path(__file__).parents[2] / "configs").glob("compare_*.yaml")):
        config = load_config(str(path))
        assert config["methods"][0] == "base" and "simoe" in config["methods"]


def test_a_shared_option_one_method_ignores_is_refused_before_any_run(tmp_path):
    from simoe.recipes.compare import load_config

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": "m", "methods": ["base", "full", "simoe"], "output_dir": str(tmp_path),
        "train": {"max_steps": 2, "num_experts": 2}, "eval": {}}))
    with pytest.raises(ValueError, match=r"study\.yaml: train: .*--method full: num_experts \(applies to"):
        load_config(str(path))
