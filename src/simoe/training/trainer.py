"""Instruction tuning with SIMoE on ``transformers.Trainer``.

Trainer brings gradient accumulation, bf16, activation checkpointing, logging backends and
``accelerate launch`` / ``torchrun``; :class:`SIMoETrainer` adds what SIMoE needs on top:

* the objective of spec §4: NLL + Lagrangian sparsity (λ maximised) + μ · orthogonality, with
  separate learning rates for Δ, mask logits, router and λ;
* router temperature annealing and the sparsity-target warm-up, both pure functions of the step,
  so a resumed run continues them exactly;
* gate noise from a generator seeded identically on every rank (data-parallel runs equal one
  process with the same global batch) and checkpointed with the other RNG states;
* checkpoints that hold only the trainable tensors (plus optimizer, scheduler and RNG state),
  staged (:mod:`simoe.training.checkpoints`), so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from simoe.io import load_state_into, read_state, save_state
from simoe.model import SIMoEModel
from simoe.objectives import (
    SIMoERegularizer,
    deterministic_nonzero,
    expected_density,
    routing_balance,
    routing_entropy,
    routing_information,
)
from simoe.routed_model import unsharded
from simoe.training.arguments import SIMoETrainingArguments
from simoe.training.checkpoints import StagedCheckpoints
from simoe.training.compaction import CompactAfterWarmup, load_compaction, save_compaction
from simoe.training.console import compact_console
from simoe.training.faults import StopOnNonFinite
from simoe.training.zero3 import PrepareZero3

logger = logging.get_logger(__name__)


LAGRANGIAN_NAME = "simoe_lagrangian.safetensors"


GATE_RNG_NAME = "simoe_gate_rng.safetensors"


LAGRANGIAN_OPTIMIZER_NAME = "simoe_lagrangian_optimizer.pt"


_MASK_GROUP = 1  # position in SIMoETrainer.create_optimizer's param groups


def _constant(step: int) -> float:
    return 1.0


def _steps(value: float, total: int) -> int:
    return int(math.ceil(value * total)) if value < 1 else int(value)


class _AfterOptimizerStep(TrainerCallback):
    """Step λ (its own optimizer), clamp log α into range (clamping data keeps gradients alive),
    reset λ1 where its constraint is met (``SparsityLagrangian.release_met``) and clear λ's
    gradients, which Trainer's ``model.zero_grad()`` does not reach: λ lives beside the model."""

    def __init__(self, trainer: SIMoETrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.sync_lagrangian_lr()  # the step's learning rate, as the model's optimizer had it
        self.trainer.lagrangian_optimizer.step()
        model.clamp_mask_logits_()
        regularizer = self.trainer.regularizer
        regularizer.lagrangian.release_met()
        regularizer.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_lagrangian_lr()  # after the scheduler's step, like the model's groups


class SIMoETrainer(StagedCheckpoints, Trainer):
    """``Trainer`` for a :class:`SIMoEModel`; use it exactly like ``Trainer``.

    Batches carry ``input_ids``, ``attention_mask``, ``labels`` and ``prompt_mask`` (what the
    router reads), as :func:`simoe.data.build_dataset` and its collator produce.
    """

    def __init__(self, model: SIMoEModel, args: SIMoETrainingArguments, **kwargs):
        if not isinstance(model, SIMoEModel):
            raise TypeError(f"SIMoETrainer trains a SIMoEModel, got {type(model).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        # The NLL is normalised below by the token count of the whole accumulated batch.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = True
        self.regularizer = SIMoERegularizer(model.simoe_config, warmup_steps=0).to(args.device)
        # λ lives beside the model, so it has an optimizer of its own: the one Trainer hands to
        # accelerate may hold only the model's tensors, which FSDP2 / DeepSpeed swap for their shards
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer_kwargs.pop("lr", None)
        self.lagrangian_optimizer = optimizer_cls(
            [{"params": list(self.regularizer.parameters()), "lr": args.lagrangian_learning_rate,
              "weight_decay": 0.0}], **optimizer_kwargs)
        model.seed_gates(args.seed)  # the same seed on every rank: identical gate noise
        self._gate_step, self._gate_state = -1, None
        # Since the last log: [NLL sum, response tokens, router-entropy sum, examples, routing
        # information sum, micro-batches, train-gate NLL sum, eval-gate NLL sum, tokens, routing
        # balance sum]; slots 6-8 cover the batches of logging steps only (see gate_gap)
        self._window = torch.zeros(10, dtype=torch.float64, device=args.device)
        self.add_callback(_AfterOptimizerStep(self))
        compact_console(self)
        self.add_callback(StopOnNonFinite())
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            self.add_callback(PrepareZero3())
        if args.compact_after_warmup:
            model.check_compactable()  # now, not when the warm-up ends
            self.add_callback(CompactAfterWarmup(self))

    # ------------------------------------------------------------------ schedules
    def router_temperature(self, step: int) -> float:
        """τ annealed linearly from τ0 to τ_min over the run."""
        c = self.model.simoe_config
        frac = min(1.0, step / max(1, self.state.max_steps - 1))
        return c.router_temperature + frac * (c.router_min_temperature - c.router_temperature)

    def sparsity_warmup_steps(self) -> int:
        """Optimizer steps over which the target density falls to its final value."""
        return _steps(self.args.sparsity_warmup_steps, self.state.max_steps)

    # ------------------------------------------------------------------ optimizer and loss
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a, groups = self.args, self.model.parameter_groups()
            param_groups = [
                {"params": groups["delta"], "lr": a.learning_rate, "weight_decay": a.weight_decay},
                {"params": groups["mask_logits"], "lr": a.mask_learning_rate, "weight_decay": 0.0},
                {"params": groups["router"], "lr": a.router_learning_rate or a.learning_rate,
                 "weight_decay": a.weight_decay},
            ]
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(a, self.model)
            optimizer_kwargs.pop("lr", None)  # every group sets its own
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule for Δ and the router; with ``constant_mask_learning_rate``, constant
        learning rates for the mask logits and λ (the sparsity controller; see sync_lagrangian_lr)."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.args.constant_mask_learning_rate:
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(f"constant_mask_learning_rate needs a LambdaLR schedule, and "
                                 f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not one; pass "
                                 "--constant_mask_learning_rate false")
            scheduler.lr_lambdas[_MASK_GROUP] = _constant
            scheduler.optimizer.param_groups[_MASK_GROUP]["lr"] = scheduler.base_lrs[_MASK_GROUP]
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return scheduler

    def sync_lagrangian_lr(self) -> None:
        """λ's learning rate: ``lagrangian_learning_rate``, times the schedule's current factor (Δ's
        learning rate over its base) unless ``constant_mask_learning_rate``."""
        a, factor = self.args, 1.0
        if not a.constant_mask_learning_rate and a.learning_rate > 0:
            factor = self.optimizer.param_groups[0]["lr"] / a.learning_rate
        self.lagrangian_optimizer.param_groups[0]["lr"] = a.lagrangian_learning_rate * factor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        simoe = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        local_tokens = labels[:, 1:].ne(-100).sum()
        if not model.training:  # evaluation: the plain NLL
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        step = self.state.global_step
        simoe.set_router_temperature(self.router_temperature(step))
        self._same_gates_within_step(simoe.gate_generator, step)
        # Before the training forward, whose gates activation checkpointing must find in place.
        eval_nll = self._eval_gate_nll(model, inputs) if self._logs_after(step) else None
        if num_items_in_batch is None:
            num_items_in_batch = local_tokens
        # The base's loss is Σ token NLL / num_items_in_batch (tokens of the whole accumulated and,
        # by default, global batch), so summing over micro-steps and ranks gives the exact mean.
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        nll = outputs.loss
        # DDP averages gradients over ranks; undo that for a sum over the global batch.
        ranks = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        self.regularizer.warmup_steps = self.sparsity_warmup_steps()
        reg, _ = self.regularizer(simoe.routed_layers(), step)
        routing = simoe.last_routing
        information, balance = routing_information(routing), routing_balance(routing)
        c = simoe.simoe_config
        routing_terms = c.router_balance_weight * balance - c.router_information_weight * information
        loss = nll * ranks + (reg + routing_terms) / self.current_gradient_accumulation_steps

        r = routing.detach()
        entropy = routing_entropy(r)
        nll_sum = nll.detach().double() * num_items_in_batch
        gap = (torch.stack([nll_sum, eval_nll, local_tokens.double()]) if eval_nll is not None
               else torch.zeros(3, dtype=torch.float64, device=nll.device))
        self._window += torch.cat([torch.stack([
            nll_sum, local_tokens.double(), entropy.sum().double(),
            torch.tensor(float(r.shape[0]), device=r.device, dtype=torch.float64),
            information.detach().double(), torch.ones((), device=r.device, dtype=torch.float64),
        ]), gap.to(nll.device), balance.detach().double().reshape(1)]).to(self._window.device)
        return (loss, outputs) if return_outputs else loss

    def _logs_after(self, step: int) -> bool:
        """Whether Trainer logs after the optimizer step that ``step`` (0-based) is about to take."""
        every = self.args.logging_steps
        every = _steps(every, self.state.max_steps) if every < 1 else int(every)
        return every > 0 and (step + 1) % every == 0

    @torch.no_grad()
    def _eval_gate_nll(self, model, inputs) -> torch.Tensor:
        """Σ response-token NLL of this micro-batch with the evaluation gates (eval mode), for the
        logged gate gap: eval-gate NLL minus train-gate NLL on the same tokens, before this step's
        update. Zero up to dropout for noise-free gates; what the stochastic regime loses at
        evaluation."""
        model.eval()
        try:
            outputs = model(**inputs)
        finally:
            model.train()
        tokens = inputs["labels"][:, 1:].ne(-100).sum()
        return outputs.loss.detach().double() * tokens

    def _same_gates_within_step(self, generator: torch.Generator, step: int) -> None:
        """Every micro-batch of an optimizer step draws the same gates (log α does not change
        within a step), so accumulating k micro-batches equals one k-times larger batch, just as
        data-parallel ranks do with their identically seeded generators."""
        if self._gate_step != step:
            self._gate_step, self._gate_state = step, generator.get_state()
        else:
            generator.set_state(self._gate_state)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "eval_loss" not in logs:
            logs.update(self.simoe_metrics())
        super().log(logs, start_time)

    @torch.no_grad()
    def simoe_metrics(self) -> dict[str, float]:
        """NLL and router entropy since the last log (all ranks), and the SIMoE state now."""
        with unsharded(self.model):  # FSDP2: log α whole (every rank logs)
            return self._simoe_metrics()

    def _simoe_metrics(self) -> dict[str, float]:
        window = self.accelerator.reduce(self._window.clone(), reduction="sum")
        self._window.zero_()
        simoe = self.accelerator.unwrap_model(self.model)
        layers = [layer for _, layer in simoe.routed_layers()]
        exp_expert, exp_union = expected_density(layers)
        det_expert, det_union, total = deterministic_nonzero(layers)
        step = self.state.global_step
        reg = self.regularizer
        _, parts = reg(layers, step)
        out = {
            "nll": (window[0] / window[1].clamp_min(1)).item(),
            "router_entropy": (window[2] / window[3].clamp_min(1)).item(),
            "router_information": (window[4] / window[5].clamp_min(1)).item(),
            "router_balance": (window[9] / window[5].clamp_min(1)).item(),
            "router_temperature": self.router_temperature(step),
            "target_density": parts["target_density"],
            "orthogonality": float(parts["orthogonality"]),
            "density/union_expected": exp_union.item(),
            "density/union_deterministic": det_union / total,
        }
        if window[8] > 0:
            out["gate_gap"] = ((window[7] - window[6]) / window[8]).item()
        for m, (e, d) in enumerate(zip(exp_expert.tolist(), det_expert.tolist(), strict=True)):
            out[f"density/expert{m}_expected"] = e
            out[f"density/expert{m}_deterministic"] = d / total
        for name in ("lambda1", "lambda2"):
            values = getattr(reg.lagrangian, name).tolist()
            out.update({name: values[0]} if len(values) == 1 else
                       {f"{name}/expert{m}": v for m, v in enumerate(values)})
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Only the SIMoE tensors (no base weights), λ, the compacted columns and the tokenizer."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        # under FSDP / DeepSpeed, state_dict is the full state dict Trainer gathered on every rank
        simoe = self.accelerator.unwrap_model(self.model)
        simoe.save_pretrained(output_dir, state_dict=state_dict)
        save_compaction(simoe, output_dir)
        save_state(dict(self.regularizer.named_parameters()), os.path.join(output_dir, LAGRANGIAN_NAME))
        torch.save(self.lagrangian_optimizer.state_dict(),
                   os.path.join(output_dir, LAGRANGIAN_OPTIMIZER_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        simoe = self.accelerator.unwrap_model(self.model)
        simoe.expand_()
        simoe.load_routed_weights(resume_from_checkpoint)
        load_compaction(simoe, resume_from_checkpoint, self.optimizer)  # before the optimizer state

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's, then λ and its optimizer: here rather than in ``_load_from_checkpoint``, which
        Trainer skips under DeepSpeed (whose own checkpoint restores the model's tensors)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        load_state_into(dict(self.regularizer.named_parameters()), os.path.join(checkpoint, LAGRANGIAN_NAME))
        path = os.path.join(checkpoint, LAGRANGIAN_OPTIMIZER_NAME)
        if os.path.isfile(path):  # the optimizer moves its state to λ's device
            self.lagrangian_optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        generator = self.accelerator.unwrap_model(self.model).gate_generator
        if self.args.should_save and generator is not None:
            save_state({"state": generator.get_state()}, os.path.join(output_dir, GATE_RNG_NAME))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, GATE_RNG_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            self.accelerator.unwrap_model(self.model).gate_generator.set_state(read_state(path)["state"])

