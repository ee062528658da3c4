"""Instruction data: records (records, sni, synthetic), token ids (templates), batches (dataset)."""

from simoe.data.dataset import SIMoECollator, build_dataset
from simoe.data.records import (
    FILE_SUFFIXES,
    FORMATS,
    GROUP_FIELDS,
    ROLES,
    SYNTHETIC,
    check_messages,
    detect_format,
    load_records,
    normalize_record,
)
from simoe.data.sni import SNITask, load_sni_tasks, sni_prompt
from simoe.data.templates import eos_ids, pad_id_of, render_prompt, template_affixes, tokenize_record

__all__ = [
    "FILE_SUFFIXES", "FORMATS", "GROUP_FIELDS", "ROLES", "SYNTHETIC", "SIMoECollator", "SNITask",
    "build_dataset", "check_messages", "detect_format", "eos_ids", "load_records", "load_sni_tasks",
    "normalize_record", "pad_id_of", "render_prompt", "sni_prompt", "template_affixes", "tokenize_record",
]
