"""simoe.io: atomic writes keep the previous file on failure; the JSON Lines reader names the line."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from simoe import io


def _fail(*args, **kwargs):
    raise OSError("disk full")


def _half_written(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half")
    raise OSError("disk full")


WRITES = {
    "json": (io.save_json, {"a": 1}),
    "jsonl": (io.save_jsonl, [{"a": 1}, {"b": "é\u2028"}]),
    "text": (io.save_text, "new\n"),
    "state": (io.save_state, {"w": torch.ones(2, 3)}),
}


@pytest.mark.parametrize("kind", WRITES)
@pytest.mark.parametrize("where", ["serialise", "replace"])
def test_failed_write_keeps_the_previous_file_and_no_tmp(tmp_path, monkeypatch, kind, where):
    save, data = WRITES[kind]
    path = tmp_path / f"out.{kind}"
    path.write_bytes(b"previous")
    if where == "replace":
        monkeypatch.setattr(os, "replace", _fail)
    elif kind == "state":
        monkeypatch.setattr(io, "save_file", _half_written)
    else:  # json.dumps raises on an object it cannot encode; f.write(None) after the .tmp is open
        data = {"a": object()} if kind == "json" else [{"a": object()}] if kind == "jsonl" else None
    with pytest.raises((OSError, TypeError)):
        save(data, path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("kind", WRITES)
def test_write_replaces_the_file_and_reads_back(tmp_path, kind):
    save, data = WRITES[kind]
    path = tmp_path / f"out.{kind}"
    path.write_bytes(b"previous")
    save(data, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    if kind == "json":
        assert io.load_json_object(path) == data
    elif kind == "jsonl":
        assert io.read_jsonl(path) == data  # U+2028 inside a string does not split the line
    elif kind == "text":
        assert path.read_text(encoding="utf-8") == data
    else:
        assert torch.equal(load_file(path)["w"], data["w"])


def test_read_jsonl_skips_blank_lines_and_checks_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1, "x": 2}\n\n  \n{"id": 3}\n', encoding="utf-8")
    assert io.read_jsonl(path, ("id",)) == [{"id": 1, "x": 2}, {"id": 3}]
    assert list(io.iter_jsonl(path)) == [(1, {"id": 1, "x": 2}), (4, {"id": 3})]
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:line 4: field 'x' is missing$"):
        io.read_jsonl(path, ("id", "x"))


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": 1', "invalid JSON line"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": 0}) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:line 3: {message}"):
        io.read_jsonl(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_an_error_naming_it(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    io.save_state({"a": torch.ones(64, 64), "b": torch.zeros(3)}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not safetensors at all",
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable safetensors file")):
        io.read_state(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable safetensors file")):
        io.load_state_into({"a": torch.empty(64, 64), "b": torch.empty(3)}, path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        io.read_state(tmp_path / "missing.safetensors")
