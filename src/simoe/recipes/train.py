"""The training recipe behind ``simoe train``: load the base, build the method's model, tokenize the
data, train with the method's trainer, save the model and ``train_summary.json``.
"""

from __future__ import annotations

import dataclasses
import os

from transformers import set_seed

from simoe.baselines import BaselineConfig, build, parameter_counts
from simoe.config import SIMoEConfig
from simoe.inference.routing import mean_routing
from simoe.io import save_json
from simoe.training.arguments import DataArguments, ModelArguments, SIMoETrainingArguments
from simoe.training.baseline_trainer import BaselineTrainer
from simoe.training.trainer import SIMoETrainer
from simoe.training.zero3 import whole_base


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated by torch when training on one, else the process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def routing_load(model, dataset, collator, prompts: int = 256, batch_size: int = 16) -> dict:
    """How the router divides the first ``prompts`` training prompts: each expert's mean share."""
    n = min(prompts, len(dataset))
    batches = (collator([dataset[i] for i in range(start, min(start + batch_size, n))])
               for start in range(0, n, batch_size))
    return {"routing_prompts": n, "routing_load": mean_routing(model, batches).tolist()}


def run_train(
    model_args: ModelArguments,
    data_args: DataArguments,
    config: SIMoEConfig | BaselineConfig,
    training_args: SIMoETrainingArguments,
) -> SIMoETrainer | BaselineTrainer:
    """Load the base, build the method's model (upcycle it, for SIMoE), tokenize the data, train,
    and save the result to ``output_dir``."""
    from simoe.data import SIMoECollator, build_dataset
    from simoe.hub import load_model_and_tokenizer

    if not data_args.data:
        raise ValueError("no training data: pass --data (or `data:` in the --config file)")
    set_seed(training_args.seed)  # before upcycling: mask noise and router init are seeded
    with whole_base(training_args):  # upcycled whole; ZeRO-3 partitions it when the trainer wraps it
        base, tokenizer = load_model_and_tokenizer(
            model_args.model_name_or_path, dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
        )
    config = dataclasses.replace(config, base_model_name_or_path=model_args.model_name_or_path)
    model = build(model_args.method, base, config, tokenizer)
    with training_args.main_process_first(desc="tokenizing"):
        dataset, stats = build_dataset(
            data_args.data, tokenizer, data_format=data_args.data_format,
            max_seq_length=data_args.max_seq_length, split=data_args.split,
            max_instances_per_task=data_args.max_instances_per_task,
            prompt_field=data_args.prompt_field, response_field=data_args.response_field,
            skip_bad_records=data_args.skip_bad_records, seed=training_args.seed,
        )
    trainer_cls = SIMoETrainer if model_args.method == "simoe" else BaselineTrainer
    trainer = trainer_cls(
        model, training_args, train_dataset=dataset, data_collator=SIMoECollator(tokenizer),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if model_args.method == "simoe":  # for the model card that save_model writes
        model.training_record = {"data": data_args.data, "examples": stats["examples"],
                                 "steps": trainer.state.global_step,
                                 **routing_load(model, dataset, SIMoECollator(tokenizer))}
    trainer.save_model(training_args.output_dir)
    if training_args.should_save:
        summary = {"method": model_args.method, "data": stats, "parameters": parameter_counts(model),
                   "seconds_per_step": result.metrics["train_runtime"] / max(1, result.global_step),
                   "peak_memory_mb": peak_memory_mb(), "log_history": trainer.state.log_history}
        if model_args.method == "simoe":
            summary["sparsity"] = model.sparsity_report()
        save_json(summary, os.path.join(training_args.output_dir, "train_summary.json"))
    return trainer

