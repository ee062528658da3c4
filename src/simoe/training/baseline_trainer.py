"""The baselines' trainer: ``transformers.Trainer`` on the same batches SIMoE trains on."""

from __future__ import annotations

import torch
from transformers import Trainer

from simoe.training.arguments import SIMoETrainingArguments
from simoe.training.checkpoints import StagedCheckpoints
from simoe.training.console import compact_console
from simoe.training.faults import StopOnNonFinite


class BaselineTrainer(StagedCheckpoints, Trainer):
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
        self.add_callback(StopOnNonFinite())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer already drops the column for models whose forward lacks it (remove_unused_columns)
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
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.routes_on_prompt:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.accelerator.unwrap_model(self.model).load_routed_weights(resume_from_checkpoint)

