"""Instruction tuning with SIMoE on ``transformers.Trainer``.

Trainer brings gradient accumulation, bf16, activation checkpointing, logging backends and
``accelerate launch`` / ``torchrun``; this module adds what SIMoE needs on top:

* the objective of spec §4: NLL + Lagrangian sparsity (λ maximised) + μ · orthogonality, with
  separate learning rates for Δ, mask logits, router and λ;
* router temperature annealing and the sparsity-target warm-up, both pure functions of the step,
  so a resumed run continues them exactly;
* gate noise from a generator seeded identically on every rank (data-parallel runs equal one
  process with the same global batch) and checkpointed with the other RNG states;
* checkpoints that hold only the trainable tensors (plus optimizer, scheduler and RNG state),
  staged in a hidden folder and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from simoe.io import load_state_into, save_state
from simoe.model import SIMoEModel
from simoe.objectives import SIMoERegularizer, deterministic_nonzero, expected_density

logger = logging.get_logger(__name__)

LAGRANGIAN_NAME = "simoe_lagrangian.safetensors"
GATE_RNG_NAME = "simoe_gate_rng.safetensors"
_STAGING = ".staging"


@dataclass
class SIMoETrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the learning rates and schedules SIMoE adds.

    ``learning_rate`` is Δ's (it plays the role of full fine-tuning's learning rate).
    """

    mask_learning_rate: float = field(
        default=0.05,
        metadata={"help": "Learning rate of the hard-concrete mask logits log α (much larger than Δ's)."},
    )
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the router; default: learning_rate."}
    )
    lagrangian_learning_rate: float = field(
        default=0.1, metadata={"help": "Learning rate of the Lagrange multipliers λ (gradient ascent)."}
    )
    constant_mask_learning_rate: bool = field(
        default=True,
        metadata={
            "help": "Keep the learning rates of the mask logits and λ constant (as CoFi pruning does), "
            "so the sparsity controller can still correct the density at the end of training; false: "
            "they follow lr_scheduler_type like Δ's."
        },
    )
    sparsity_warmup_steps: float = field(
        default=0.3,
        metadata={
            "help": "Steps over which the target density falls linearly from 1.0 to 1 - target_sparsity; "
            "a value below 1 is a fraction of the total training steps."
        },
    )


# The methods each SIMoETrainingArguments option of its own applies to (`simoe train` rejects the
# others; HfArgumentParser hands field metadata to argparse, so it cannot carry this).
TRAINING_OPTION_METHODS = {
    "mask_learning_rate": ("simoe",),
    "router_learning_rate": ("simoe", "smear"),
    "lagrangian_learning_rate": ("simoe",),
    "constant_mask_learning_rate": ("simoe",),
    "sparsity_warmup_steps": ("simoe",),
}

_MASK_GROUP, _LAGRANGIAN_GROUP = 1, 3  # positions in SIMoETrainer.create_optimizer's param groups


def _constant(step: int) -> float:
    return 1.0


def _steps(value: float, total: int) -> int:
    return int(math.ceil(value * total)) if value < 1 else int(value)


class _AfterOptimizerStep(TrainerCallback):
    """Clamp log α into range (clamping data keeps gradients alive), reset λ1 where its constraint
    is met (``SparsityLagrangian.release_met``) and clear λ's gradients,
    which Trainer's ``model.zero_grad()`` does not reach: λ lives beside the model, not in it."""

    def __init__(self, regularizer: SIMoERegularizer):
        self.regularizer = regularizer

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.clamp_mask_logits_()
        self.regularizer.lagrangian.release_met()
        self.regularizer.zero_grad(set_to_none=True)


def console_line(logs: dict[str, float], state) -> str:
    """One compact line for a training log: step, loss terms, densities, λ, routing, speed."""
    parts = [f"step {state.global_step}/{state.max_steps}"]
    if "nll" in logs:
        parts.append(f"nll {logs['nll']:.3f}")
        if "gate_gap" in logs:
            parts.append(f"gap {logs['gate_gap']:+.3f}")
        parts.append(f"union {logs['density/union_deterministic']:.3f} eval / "
                     f"{logs['density/union_expected']:.3f} exp (target {logs['target_density']:.3f})")
        lambdas = [v for k, v in logs.items() if k == "lambda1" or k.startswith("lambda1/")]
        parts.append(f"λ {max(lambdas):.3g}")
        parts.append(f"H(r) {logs['router_entropy']:.2f}")
    elif "loss" in logs:
        parts.append(f"loss {logs['loss']:.3f}")
    if "grad_norm" in logs:
        parts.append(f"|g| {logs['grad_norm']:.3g}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    return " · ".join(parts)


class _CompactProgress(ProgressCallback):
    """Trainer's progress bar, with one compact line per log instead of the whole metric dict
    (which still goes to ``report_to`` backends and ``trainer_state.json``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        if "loss" not in logs and "nll" not in logs:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        line = console_line(logs, state)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def compact_console(trainer: Trainer) -> None:
    """Swap Trainer's dict-printing callbacks for :class:`_CompactProgress`."""
    for cls in (ProgressCallback, PrinterCallback):
        if trainer.pop_callback(cls) is not None:
            trainer.add_callback(_CompactProgress)
            return


class _StagedCheckpoints:
    """Checkpoints are written into ``OUT/.staging/`` and renamed into place once complete, so a
    crash mid-save never leaves a checkpoint that looks whole (Trainer writes in place)."""

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a hidden staging folder, then rename it into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, _STAGING)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            staging, final = os.path.join(run_dir, _STAGING), os.path.join(run_dir, name)
            if os.path.exists(final):  # re-saving a step (e.g. the final save after a resume)
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(staging, run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()



class SIMoETrainer(_StagedCheckpoints, Trainer):
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
        model.seed_gates(args.seed)  # the same seed on every rank: identical gate noise
        self._gate_step, self._gate_state = -1, None
        # Since the last log: [NLL sum, response tokens, router-entropy sum, examples, routing
        # information sum, micro-batches, train-gate NLL sum, eval-gate NLL sum, tokens, routing
        # balance sum]; slots 6-8 cover the batches of logging steps only (see gate_gap)
        self._window = torch.zeros(10, dtype=torch.float64, device=args.device)
        self.add_callback(_AfterOptimizerStep(self.regularizer))
        compact_console(self)

    # ------------------------------------------------------------------ schedules
    def router_temperature(self, step: int) -> float:
        """τ annealed linearly from τ0 to τ_min over the run."""
        c = self.model.simoe_config
        frac = min(1.0, step / max(1, self.state.max_steps - 1))
        return c.router_temperature + frac * (c.router_min_temperature - c.router_temperature)

    # ------------------------------------------------------------------ optimizer and loss
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a, groups = self.args, self.model.parameter_groups()
            param_groups = [
                {"params": groups["delta"], "lr": a.learning_rate, "weight_decay": a.weight_decay},
                {"params": groups["mask_logits"], "lr": a.mask_learning_rate, "weight_decay": 0.0},
                {"params": groups["router"], "lr": a.router_learning_rate or a.learning_rate,
                 "weight_decay": a.weight_decay},
                {"params": list(self.regularizer.parameters()), "lr": a.lagrangian_learning_rate,
                 "weight_decay": 0.0},
            ]
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(a, self.model)
            optimizer_kwargs.pop("lr", None)  # every group sets its own
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule for Δ and the router; with ``constant_mask_learning_rate``, constant
        learning rates for the mask logits and λ (the sparsity controller)."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.args.constant_mask_learning_rate:
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(f"constant_mask_learning_rate needs a LambdaLR schedule, and "
                                 f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not one; pass "
                                 "--constant_mask_learning_rate false")
            for i in (_MASK_GROUP, _LAGRANGIAN_GROUP):
                scheduler.lr_lambdas[i] = _constant
                scheduler.optimizer.param_groups[i]["lr"] = scheduler.base_lrs[i]
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return scheduler

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
        self.regularizer.warmup_steps = _steps(self.args.sparsity_warmup_steps, self.state.max_steps)
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
        """Only the SIMoE tensors (no base weights), λ and the tokenizer."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        save_state(dict(self.regularizer.named_parameters()), os.path.join(output_dir, LAGRANGIAN_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        simoe = self.accelerator.unwrap_model(self.model)
        simoe.load_routed_weights(resume_from_checkpoint)
        load_state_into(dict(self.regularizer.named_parameters()),
                        os.path.join(resume_from_checkpoint, LAGRANGIAN_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        generator = self.accelerator.unwrap_model(self.model).gate_generator
        if self.args.should_save and generator is not None:
            save_state({"state": generator.get_state()}, os.path.join(output_dir, GATE_RNG_NAME))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, GATE_RNG_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            self.accelerator.unwrap_model(self.model).gate_generator.set_state(load_file(path)["state"])


def routing_entropy(routing: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each routing distribution (the last dimension)."""
    return -(routing * routing.clamp_min(1e-12).log()).sum(-1)


def routing_information(routing: torch.Tensor) -> torch.Tensor:
    """I(prompt; expert) over a batch, H(mean r) - mean H(r), in nats: 0 when every prompt has the
    same routing (or a uniform one), ln M when each prompt picks one expert and all are used
    equally. SIMoETrainer adds -router_information_weight times it to the loss."""
    return routing_entropy(routing.mean(dim=0)) - routing_entropy(routing).mean()


def routing_balance(routing: torch.Tensor) -> torch.Tensor:
    """KL(uniform || mean r) over a batch, in nats: 0 when every expert carries 1/M of the routing
    mass, growing without bound as one is starved. Its gradient on a starved expert's logit stays
    about 1/(M τ) however small its share (H(mean r)'s vanishes with the softmax's); SIMoETrainer
    adds router_balance_weight times it to the loss."""
    load = routing.mean(dim=0).clamp_min(1e-12)
    return -math.log(routing.shape[-1]) - load.log().mean()


class BaselineTrainer(_StagedCheckpoints, Trainer):
    """``Trainer`` for the baselines (``simoe.baselines``) on the same batches as SIMoE.

    Plain HF and PEFT models take no ``prompt_mask``, so it is dropped for them; SMEAR routes on it
    and trains its experts at ``learning_rate`` and its router at ``router_learning_rate``, and
    saves only its own tensors. Everything else is ``Trainer`` as is (sparse upcycling's MoE adds
    its load-balancing loss in train mode).
    """

    def __init__(self, model, args: SIMoETrainingArguments, **kwargs):
        from simoe.baselines.smear import SMEARModel

        self.routes_on_prompt = isinstance(model, SMEARModel)
        super().__init__(model=model, args=args, **kwargs)
        compact_console(self)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "prompt_mask" not in self._signature_columns:  # the collator pads it; compute_loss drops it
            self._signature_columns.append("prompt_mask")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.routes_on_prompt:
            inputs = {k: v for k, v in inputs.items() if k != "prompt_mask"}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.routes_on_prompt:
            a, groups = self.args, self.model.parameter_groups()
            param_groups = [
                {"params": groups["experts"], "lr": a.learning_rate, "weight_decay": a.weight_decay},
                {"params": groups["router"], "lr": a.router_learning_rate or a.learning_rate,
                 "weight_decay": a.weight_decay},
            ]
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(a, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.routes_on_prompt:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.routes_on_prompt:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.accelerator.unwrap_model(self.model).load_routed_weights(resume_from_checkpoint)
