"""SIMoETrainer: exact resume after a kill, data-parallel equivalence, the objective at work."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_training, same_logs, same_weights
from safetensors.torch import load_file


def _train(out: Path, launcher: list[str] | None = None, check: bool = True, **opts) -> dict[int, dict]:
    return run_training("train_tiny.py", out, launcher, check, **opts)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    full = _train(tmp_path / "full", max_steps=8)
    killed_dir = tmp_path / "killed"
    proc_log = _train(killed_dir, check=False, max_steps=8, kill_at=6)
    # killed at the end of step 6, before its log line: it really died mid-run
    assert max(proc_log) == 5 and not (killed_dir / "final").exists()
    assert sorted(p.name for p in killed_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    ckpt = killed_dir / "checkpoint-4"
    # only the trainable tensors (no base weights) plus optimizer / scheduler / RNG state
    assert (ckpt / "simoe_model.safetensors").stat().st_size < 2 * sum(
        t.numel() * 4 for t in load_file(ckpt / "simoe_model.safetensors").values())
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "simoe_gate_rng.safetensors",
            "simoe_lagrangian.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    (killed_dir / "log.jsonl").unlink()
    resumed = _train(killed_dir, max_steps=8, resume=str(ckpt))
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(1, 6):
        same_logs(proc_log[step], full[step])
    for step in resumed:
        same_logs(resumed[step], full[step])
    same_weights(tmp_path / "full/final", killed_dir / "final", rtol=1e-5)


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process_with_the_same_global_batch(tmp_path):
    one = _train(tmp_path / "one", max_steps=3, batch=4)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29533"]
    two = _train(tmp_path / "two", launcher=torchrun, max_steps=3, batch=2)
    assert sorted(two) == [1, 2, 3]
    for step in one:
        same_logs(one[step], two[step])
    # all-reduce sums in another order; Adam's division by √v turns that into ~1e-6 on log α and the
    # router's small output weights (values 0.4 and 0.03)
    same_weights(tmp_path / "one/final", tmp_path / "two/final", rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    whole = _train(tmp_path / "whole", max_steps=3, batch=4)
    accumulated = _train(tmp_path / "acc", max_steps=3, batch=2, accumulation=2)
    for step in whole:
        same_logs(whole[step], accumulated[step])


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["noise-free", "stochastic"])
def test_training_lowers_the_nll_and_meets_the_sparsity_target(tmp_path, regime):
    from train_tiny import collate, dataset
    from transformers import set_seed

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    set_seed(0)
    from conftest import tiny_model, train_without_dropout

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=4, target_sparsity=0.6, gate_regime=regime))
    train_without_dropout(model)
    args = SIMoETrainingArguments(
        output_dir=str(tmp_path), max_steps=200, per_device_train_batch_size=8, learning_rate=3e-3,
        mask_learning_rate=0.1, lagrangian_learning_rate=0.1, sparsity_warmup_steps=0.3, logging_steps=20,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    data = dataset(96)
    trainer = SIMoETrainer(model, args, train_dataset=data, data_collator=collate)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "nll" in h]
    print(regime, logs[-1])
    assert logs[-1]["nll"] < 0.75 * logs[0]["nll"]
    assert logs[-1]["router_temperature"] == pytest.approx(model.simoe_config.router_min_temperature)
    assert all("gate_gap" in h for h in logs)
    union = model.sparsity_report()["union"]
    if regime == "stochastic":
        assert logs[-1]["density/union_expected"] == pytest.approx(0.4, abs=0.03)
        assert union["deterministic_density"] < 0.5  # the inference union follows the expected one
        return
    # noise-free: what is evaluated is what was trained. The evaluated (inference) union density
    # is at the target, the logged gap is 0, and eval-mode NLL on the training data equals
    # train-mode NLL (within 2 %, the bar; here it is exact up to float noise)
    assert union["deterministic_density"] == pytest.approx(0.4, abs=0.02)
    assert union["expected_density"] == pytest.approx(union["deterministic_density"], abs=1e-6)
    assert abs(logs[-1]["gate_gap"]) <= 0.02 * logs[-1]["nll"]
    batch = collate(data)
    with torch.no_grad():
        nll_eval = model.eval()(**batch).loss
        nll_train = model.train()(**batch).loss
    assert nll_eval == pytest.approx(nll_train.item(), rel=0.02)


def test_console_shows_one_compact_line_pertraining_log(tmp_path, capsys):
    from conftest import tiny_model
    from train_tiny import collate, dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.console import _CompactProgress
    from simoe.training.trainer import SIMoETrainer

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2))
    for disable_tqdm in (False, True):
        args = SIMoETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                      logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                                      disable_tqdm=disable_tqdm)
        trainer = SIMoETrainer(model, args, train_dataset=dataset(16), data_collator=collate)
        kinds = {type(c) for c in trainer.callback_handler.callbacks}
        assert _CompactProgress in kinds and not kinds & {ProgressCallback, PrinterCallback}
    trainer.train()
    out = capsys.readouterr().out + capsys.readouterr().err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("nll " in line and "gap " in line and "union " in line and "λ " in line and "H(r) " in line
               and line.endswith(" s/step") for line in lines)
    assert "{'loss'" not in out and "density/expert0" not in out  # no metric dict on the console
    assert "density/expert0_expected" in trainer.state.log_history[0]  # it is in the log history


@pytest.mark.parametrize("constant", [True, False])
def test_mask_and_lagrangian_learning_rates_stay_constant(tmp_path, constant):
    from conftest import tiny_model
    from train_tiny import collate, dataset

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2))
    args = SIMoETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                  learning_rate=1e-3, mask_learning_rate=0.05, lagrangian_learning_rate=0.2,
                                  lr_scheduler_type="linear", warmup_steps=1,
                                  constant_mask_learning_rate=constant, save_strategy="no", report_to="none",
                                  use_cpu=True, disable_tqdm=True)
    trainer = SIMoETrainer(model, args, train_dataset=dataset(16), data_collator=collate)
    trainer.train()
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]  # Δ, mask logits, router
    lrs += [group["lr"] for group in trainer.lagrangian_optimizer.param_groups]  # λ
    assert lrs[0] == pytest.approx(0.0) and lrs[2] == pytest.approx(0.0)  # Δ and router: decayed to 0
    if constant:
        assert lrs[1] == 0.05 and lrs[3] == 0.2
    else:
        assert lrs[1] == pytest.approx(0.0) and lrs[3] == pytest.approx(0.0)


def test_loss_is_nll_plus_regulariser_plus_the_routing_terms(tmp_path):
    from conftest import tiny_model, train_without_dropout
    from train_tiny import collate, dataset

    from simoe import SIMoEConfig, upcycle
    from simoe.objectives import routing_balance, routing_information
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    config = SIMoEConfig(num_experts=4, router_information_weight=0.3, router_balance_weight=0.7)
    model = upcycle(tiny_model("llama"), config)
    args = SIMoETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6,
                                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = SIMoETrainer(model, args, train_dataset=dataset(12), data_collator=collate)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer.state.max_steps, trainer.current_gradient_accumulation_steps = 4, 1
    train_without_dropout(model)
    inputs = collate(dataset(12)[:6])
    loss = trainer.compute_loss(model, inputs)

    nll = model(**inputs).loss
    reg, _ = trainer.regularizer(model.routed_layers(), 0)
    r = model.last_routing
    expected = nll + reg + 0.7 * routing_balance(r) - 0.3 * routing_information(r)
    assert routing_balance(r).item() > 1e-4  # the term is live at initialisation
    torch.testing.assert_close(loss, expected)


def test_a_non_finite_gradient_stops_training_before_it_reaches_weights_or_checkpoints(tmp_path):
    from conftest import tiny_model
    from train_tiny import collate, dataset

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2))
    args = SIMoETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                  save_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = SIMoETrainer(model, args, train_dataset=dataset(16), data_collator=collate)
    compute_loss = trainer.compute_loss

    def nan_from_step_3(*a, **k):
        loss = compute_loss(*a, **k)
        return loss * float("nan") if trainer.state.global_step >= 2 else loss

    trainer.compute_loss = nan_from_step_3
    with pytest.raises(FloatingPointError, match=r"step 3: the gradient of \S+ is NaN or infinite"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for path in tmp_path.glob("checkpoint-*/*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_intact_and_resumable(tmp_path, monkeypatch):
    import errno

    from conftest import tiny_model
    from train_tiny import collate, dataset
    from transformers import TrainerCallback

    from simoe import SIMoEConfig, routed_model, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    def trainer_for(model):
        args = SIMoETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                      save_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
        return SIMoETrainer(model, args, train_dataset=dataset(16), data_collator=collate)

    saved = {}

    class Snapshot(TrainerCallback):  # the bytes of checkpoint-1 as it was written
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                saved.update({p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()
                              if p.is_file()})

    save_state = routed_model.save_state

    def disk_full_at_step_2(tensors, path, *a, **k):
        if "checkpoint-2" in str(path):
            save_state(tensors, path, *a, **k)  # the file lands, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_state(tensors, path, *a, **k)

    monkeypatch.setattr(routed_model, "save_state", disk_full_at_step_2)
    trainer = trainer_for(upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2)))
    trainer.add_callback(Snapshot())
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir() if p.is_file()} == saved

    monkeypatch.setattr(routed_model, "save_state", save_state)  # space again
    resumed = trainer_for(upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*"))[-1] == "checkpoint-4"
    assert not (tmp_path / ".staging").exists()
