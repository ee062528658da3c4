"""Random malformed records thrown at the record readers (hypothesis): each is rejected with an error
naming the file and line (and the field, for a record that parses), or, with skip_bad_records, skipped
and counted; never a traceback of another kind, never a bad record accepted."""

from __future__ import annotations

import csv
import json
import re
import tempfile
import warnings
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from simoe.data import ROLES, load_records

SCALARS = (st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=16)
           | st.text(max_size=6))
JSON = st.recursive(SCALARS, lambda inner: (st.lists(inner, max_size=3)
                                           | st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                    max_leaves=5)
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                          st.sampled_from([*ROLES, "tool", ""]) | SCALARS, max_size=3)
FIELDS = st.sampled_from(["instruction", "input", "output", "prompt", "completion", "messages", "task",
                          "category", "system"])
RECORD = st.dictionaries(FIELDS | st.text(max_size=4),
                         JSON | st.lists(MESSAGE, max_size=4) | st.text(max_size=8), max_size=5)
# Lines of a JSON Lines file: records, other JSON values, and text that is not JSON at all.
LINE = RECORD.map(json.dumps) | JSON.map(json.dumps) | st.text(max_size=12).filter(lambda t: "\n" not in t)


def check(path: Path, skip: bool) -> None:
    """load_records(path) either returns well-formed records or raises ValueError naming path and line."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = load_records(path, skip_bad_records=skip)
    except ValueError as e:
        message = str(e)
        assert message.startswith(str(path)), message
        assert re.match(rf"{re.escape(str(path))}(:line \d+|:index \d+|: no records)", message), message
        return
    skipped = [w for w in caught if "skipping bad record" in str(w.message)]
    assert skip or not skipped
    for w in skipped:
        assert re.search(rf"{re.escape(str(path))}:(line|index) \d+", str(w.message)), str(w.message)
    for r in records:
        assert r["origin"].startswith(str(path))
        messages = r["messages"]
        assert messages and messages[-1]["role"] == "assistant"
        assert all(m["role"] in ROLES and isinstance(m["content"], str) and m["content"].strip()
                   for m in messages)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(LINE, min_size=1, max_size=6), skip=st.booleans())
def test_random_json_lines_are_read_or_rejected_by_file_and_line(lines, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        check(path, skip)


@settings(max_examples=100, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=4), skip=st.booleans())
def test_random_json_arrays_are_read_or_rejected_by_file_and_index(records, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        check(path, skip)


@settings(max_examples=100, deadline=None)
@given(columns=st.lists(FIELDS, min_size=1, max_size=4, unique=True),
       rows=st.lists(st.lists(st.text(max_size=6), min_size=4, max_size=4), min_size=1, max_size=4),
       skip=st.booleans())
def test_random_csv_rows_are_read_or_rejected_by_file_and_line(columns, rows, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(row[: len(columns)] for row in rows)
        check(path, skip)
