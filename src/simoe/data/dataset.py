"""A training set from any source (records tokenized, cut ones counted) and the collator that pads a batch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from simoe.data.records import read_records
from simoe.data.templates import pad_id_of, tokenize_truncated

logger = logging.getLogger(__name__)


def build_dataset(
    source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, *, data_format: str | None = None,
    max_seq_length: int = 1024, split: str | None = None, max_instances_per_task: int | None = None,
    prompt_field: str | None = None, response_field: str | None = None, skip_bad_records: bool = False,
    seed: int = 0,
) -> tuple[datasets.Dataset, dict]:
    """Tokenized training examples of ``source`` (see :func:`load_records`) and counts.

    Columns: ``input_ids``, ``attention_mask``, ``labels``, ``prompt_mask`` (for :class:`SIMoECollator`),
    ``group`` and ``origin``. Stats: ``records`` (loaded), ``skipped_bad``, ``dropped_too_long`` (no
    response token fits), ``truncated``, ``examples``, ``tokens``, ``loss_tokens``. Records keep their
    order; shuffling is the training loop's job.
    """
    records, skipped = read_records(
        source, data_format=data_format, split=split, max_instances_per_task=max_instances_per_task,
        prompt_field=prompt_field, response_field=response_field, skip_bad_records=skip_bad_records,
        seed=seed,
    )
    columns: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompt_mask")}
    columns.update(group=[], origin=[])
    dropped = truncated = 0
    for record in records:
        features, cut = tokenize_truncated(record, tokenizer, max_seq_length)
        truncated += cut
        if features is None:
            dropped += 1
            continue
        for key, value in features.items():
            columns[key].append(value)
        columns["group"].append(record.get("group"))
        columns["origin"].append(record.get("origin"))
    stats = {
        "records": len(records), "skipped_bad": skipped, "dropped_too_long": dropped, "truncated": truncated,
        "examples": len(columns["input_ids"]),
        "tokens": sum(map(len, columns["input_ids"])),
        "loss_tokens": sum(sum(label != -100 for label in labels) for labels in columns["labels"]),
    }
    if not stats["examples"]:
        raise ValueError(f"{source}: no training example left ({stats})")
    logger.info("%s: %s", source, ", ".join(f"{k}={v}" for k, v in stats.items()))
    return datasets.Dataset.from_dict(columns), stats


@dataclass
class SIMoECollator:
    """Right-pads a list of tokenized examples into long tensors for :class:`~simoe.model.SIMoEModel`.

    ``input_ids`` with the pad token (eos when there is none: masked out anyway), ``attention_mask``
    and ``prompt_mask`` with 0, ``labels`` with -100. Other keys (``group``, ``origin``) are left out,
    and so is ``prompt_mask`` when the examples lack it (Trainer removes it for models that do not
    route: their forward has no such argument).
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = pad_id_of(self.tokenizer)
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "prompt_mask": 0}
        return {
            key: torch.tensor([[*f[key], *[pad] * (length - len(f[key]))] for f in features],
                              dtype=torch.long)
            for key, pad in pads.items() if key != "prompt_mask" or "prompt_mask" in features[0]
        }

