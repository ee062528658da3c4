"""compact_after_warmup: the optimizer state follows the parameters, the trainable state shrinks
after the warm-up, a compacted run resumes exactly, and the model it ends with is an ordinary one."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_training, same_logs, same_weights, tiny_simoe, train_without_dropout

from simoe.layer import SIMoELinear
from simoe.training.compaction import COMPACTION_NAME, compact

IDS = torch.tensor([[5, 9, 3, 7, 11, 4, 6], [8, 2, 6, 12, 10, 3, 9]])


def _run(compact_after: int | None, steps: int = 4) -> dict[str, torch.Tensor]:
    """AdamW on the NLL for ``steps`` steps, compacting the model and its optimizer after step
    ``compact_after``; returns Δ and log α on the columns compaction keeps."""
    model = tiny_simoe("llama")
    train_without_dropout(model)
    keep = {name: layer.gates_on().any(dim=0).nonzero().squeeze(1)
            for name, layer in model.routed_layers() if isinstance(layer, SIMoELinear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(1, steps + 1):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == compact_after:
            compact(model, optimizer)
            for param, state in optimizer.state.items():
                assert all(v.shape == param.shape for v in state.values() if v.dim()), "state not compacted"
    out = {}
    for name, layer in model.routed_layers():
        if name in keep and layer.kept is None:  # the uncompacted reference, on the same columns
            columns = keep[name]
            out[name] = (layer.delta.index_select(layer.column_dim, columns), layer.log_alpha[:, columns])
        else:
            out[name] = (layer.delta, layer.log_alpha)
    return out


def test_optimizer_steps_after_compaction_equal_the_uncompacted_ones_on_the_kept_columns():
    """The NLL gives the dropped columns no gradient, so from the same start the two runs agree on
    the kept columns exactly when Adam's moments were compacted with them."""
    reference, compacted = _run(compact_after=None), _run(compact_after=2)
    for name, (delta, log_alpha) in reference.items():
        torch.testing.assert_close(compacted[name][0], delta, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(compacted[name][1], log_alpha, rtol=1e-5, atol=1e-6, msg=name)


def _sizes(out: Path) -> dict[int, int]:
    rows = [json.loads(line) for line in (out / "sizes.jsonl").read_text().splitlines()]
    return {r["step"]: r["params"] for r in rows}


@pytest.mark.slow
def test_compact_after_warmup_shrinks_the_state_resumes_exactly_and_ends_with_an_ordinary_model(tmp_path):
    from simoe import SIMoEModel
    from simoe.io import read_state

    opts = {"max_steps": 8, "save_steps": 2, "compact": True, "warmup": 4, "off": 0.25}
    full = run_training("train_tiny.py", tmp_path / "full", **opts)
    sizes = _sizes(tmp_path / "full")  # Δ and log α entries at each step's end
    # compacted at the end of step 4, the warm-up's: Δ and log α shrink to the columns still on
    assert sizes[1] == sizes[3] and sizes[4] <= 0.8 * sizes[3] and len({sizes[s] for s in range(4, 9)}) == 1
    assert not (tmp_path / "full/checkpoint-2" / COMPACTION_NAME).exists()
    kept = read_state(tmp_path / "full/checkpoint-4" / COMPACTION_NAME)
    assert kept and all(v.dim() == 1 for v in kept.values())
    assert not (tmp_path / "full/final" / COMPACTION_NAME).exists()  # expanded when training ended

    for start in ("checkpoint-2", "checkpoint-4"):  # before and after the compaction
        out = tmp_path / f"from-{start}"
        resumed = run_training("train_tiny.py", out, resume=str(tmp_path / "full" / start), **opts)
        for step in resumed:
            same_logs(resumed[step], full[step])
        same_weights(tmp_path / "full/final", out / "final", rtol=1e-5)

    # the final model is an ordinary SIMoE model: the dropped columns' gates are 0
    from conftest import tiny_model

    model = SIMoEModel.from_pretrained(tiny_model("llama"), tmp_path / "full/final")
    layers = dict(model.routed_layers())
    for name, columns in kept.items():
        on = layers[name].gates_on().any(dim=0)
        dropped = torch.ones_like(on)
        dropped[columns] = False
        assert not on[dropped].any(), name


@pytest.mark.slow
def test_compaction_waits_until_the_density_target_is_met(tmp_path):
    """Three quarters of the columns off against a target density of 0.5: the constraint is not met
    after the warm-up, and dropping columns then would leave a density the run could never raise."""
    run_training("train_tiny.py", tmp_path, max_steps=6, save_steps=3, compact=True, warmup=2, off=0.75)
    sizes = _sizes(tmp_path)
    assert len(set(sizes.values())) == 1  # nothing was dropped
    assert not (tmp_path / "checkpoint-6" / COMPACTION_NAME).exists()


def test_the_trainer_refuses_compaction_it_cannot_do_exactly_before_training(tmp_path):
    from conftest import tiny_model

    from simoe import SIMoEConfig, upcycle
    from simoe.training.arguments import SIMoETrainingArguments
    from simoe.training.trainer import SIMoETrainer

    model = upcycle(tiny_model("llama"), SIMoEConfig(num_experts=2, gate_regime="stochastic"))
    args = SIMoETrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                  compact_after_warmup=True)
    with pytest.raises(ValueError, match="compaction needs gate_regime='noise-free'"):
        SIMoETrainer(model, args)
