"""Data loading and tokenization on the shared real data, with byte-level tokenizers built offline.

A byte-level BPE without merges has one token per byte, so decoding is exact and every expected
token sequence can be written as text.
"""

from __future__ import annotations

import csv
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CHATML_SYSTEM_TEMPLATE, SHARED_DATA, SYSTEM, byte_tokenizer

from simoe.data import (
    SIMoECollator,
    build_dataset,
    load_records,
    load_sni_tasks,
    render_prompt,
    sni_prompt,
    tokenize_record,
)

SNI = SHARED_DATA / "sni"


@pytest.fixture(scope="module")
def chat_tok():
    return byte_tokenizer(CHATML_SYSTEM_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok():
    return byte_tokenizer(bos=True)


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def loss_text(tok, features) -> str:
    return decode(tok, [t for t in features["labels"] if t != -100])


def prompt_text(tok, features) -> str:
    return decode(tok, [t for t, m in zip(features["input_ids"], features["prompt_mask"], strict=True) if m])


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- SNI
def test_sni_prompt_is_the_tk_instruct_encoding():
    (task,) = [t for t in load_sni_tasks(SNI) if t.name == "task1146_country_capital"]
    assert task.category == "Misc."
    instance = task.instances[0]
    assert sni_prompt(task.data, instance) == (
        "Definition: In this task, you are given a country name and you need to return the capital city "
        "of the given country.\n\n"
        " Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n"
        " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n"
        "Now complete the following example -\nInput: Afghanistan.\nOutput: "
    )
    # Tk-Instruct's quirks: no "." after punctuation, one after an empty (stripped) input.
    quirky = {"Definition": "  Say it! ", "Positive Examples": [{"input": "a?", "output": "b"}] * 3}
    assert sni_prompt(quirky, {"input": "  "}, num_pos_examples=1) == (
        "Definition: Say it!\n\n Positive Example 1 -\nInput: a?\n Output: b.\n\n"
        "Now complete the following example -\nInput: .\nOutput: "
    )


def test_sni_split_and_instance_cap_match_the_index():
    with open(SNI / "index.tsv", encoding="utf-8") as f:
        index = {row["task_name"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert {t.name for t in load_sni_tasks(SNI)} == set(index)
    for split in ("test", "train"):  # train last: its records are checked below
        expected = {n: row for n, row in index.items() if row["split"] == split}
        tasks = load_sni_tasks(SNI, split)
        counts = {n: int(r["n_instances"]) for n, r in expected.items()}
        assert {t.name: len(t.instances) for t in tasks} == counts
        assert {t.name: t.category for t in tasks} == {n: r["category"] for n, r in expected.items()}

        capped = load_sni_tasks(SNI, split, max_instances_per_task=7)
        assert [t.instances for t in capped] == [t.instances[:7] for t in tasks]  # the first 7, file order
        records = load_records(SNI, split=split, max_instances_per_task=7)
        per_task = {n: min(7, int(r["n_instances"])) for n, r in expected.items()}
        assert len(records) == sum(per_task.values())
        assert {g: sum(r["group"] == g for r in records) for g in per_task} == per_task
    # records carry the prompt, the first reference and where they came from
    record = next(r for r in records if r["group"] == "task1146_country_capital")
    assert record["messages"][1] == {"role": "assistant", "content": "Kabul"}
    assert record["origin"].endswith("task1146_country_capital.json:index 0")


# ---------------------------------------------------------------------------- tokenization
def test_alpaca_with_chat_template(chat_tok):
    records = load_records(SHARED_DATA / "alpaca" / "alpaca_en_demo.json")
    raw = json.loads((SHARED_DATA / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    assert len(records) == len(raw) and records[0]["origin"].endswith("alpaca_en_demo.json:index 0")
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    for i in (0, with_input):
        user = raw[i]["instruction"] + ("\n\n" + raw[i]["input"] if raw[i]["input"] else "")
        features = tokenize_record(records[i], chat_tok, max_seq_length=4096)
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        assert decode(chat_tok, features["input_ids"]) == prompt + raw[i]["output"] + "<|im_end|>\n"
        assert loss_text(chat_tok, features) == raw[i]["output"] + "<|im_end|>"  # not the newline after it
        assert prompt_text(chat_tok, features) == prompt
        ids = render_prompt(chat_tok, records[i]["messages"])
        assert features["input_ids"][: len(ids)] == ids and sum(features["prompt_mask"]) == len(ids)
        assert features["attention_mask"] == [1] * len(features["input_ids"])


def test_gsm8k_with_plain_template(plain_tok):
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    records = load_records(path, prompt_field="question", response_field="answer")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert records[0]["origin"] == f"{path}:line 1"
    features = tokenize_record(records[0], plain_tok, max_seq_length=4096)
    prompt = f"<s>### Instruction:\n{first['question']}\n\n### Response:\n"
    assert decode(plain_tok, features["input_ids"]) == prompt + first["answer"] + "</s>"
    assert loss_text(plain_tok, features) == first["answer"] + "</s>"
    assert prompt_text(plain_tok, features) == prompt
    ids = render_prompt(plain_tok, records[0]["messages"][:1])
    assert features["input_ids"][: len(ids)] == ids and sum(features["prompt_mask"]) == len(ids)


MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
              {"role": "assistant", "content": "Yo."}, {"role": "user", "content": "Bye?"},
              {"role": "assistant", "content": "Ciao."}]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_multi_turn_loss_on_every_assistant_turn(tmp_path, chat_tok, plain_tok, template):
    tok = chat_tok if template == "chat" else plain_tok
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN, "task": "greetings"}])
    (record,) = load_records(path)
    assert record["group"] == "greetings" and record["messages"] == MULTI_TURN
    features = tokenize_record(record, tok, max_seq_length=4096)
    ids, labels = features["input_ids"], features["labels"]
    # loss spans, as text: exactly the two responses with their end tokens
    spans, current = [], []
    for t, label in zip(ids, labels, strict=True):
        assert label in (-100, t)
        if label != -100:
            current.append(t)
        elif current:
            spans.append(decode(tok, current))
            current = []
    spans += [decode(tok, current)] if current else []
    end = "<|im_end|>" if template == "chat" else "</s>"
    assert spans == ["Yo." + end, "Ciao." + end]
    # the router reads system + first user turn + assistant header, nothing after
    first_prompt = render_prompt(tok, MULTI_TURN[:2])
    assert features["prompt_mask"] == [1] * len(first_prompt) + [0] * (len(ids) - len(first_prompt))
    assert "Hi?" in prompt_text(tok, features) and "Bye?" not in prompt_text(tok, features)
    # the prompt of the second turn is exactly what precedes the second response
    second_prompt = render_prompt(tok, MULTI_TURN[:4])
    assert ids[: len(second_prompt)] == second_prompt
    assert decode(tok, ids[len(second_prompt):]).startswith("Ciao." + end)


def test_truncation_keeps_the_response_and_drops_what_cannot_fit(plain_tok):
    prompt = "".join(f"word{i} " for i in range(40))  # 280 bytes
    record = {"messages": [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": "the answer"}], "origin": "t"}
    full = tokenize_record(record, plain_tok, max_seq_length=4096)
    n_response = len("the answer") + 1  # bytes + eos
    n_prompt = len(full["input_ids"]) - n_response
    assert sum(full["prompt_mask"]) == n_prompt

    cut = tokenize_record(record, plain_tok, max_seq_length=100)
    assert cut["input_ids"] == full["input_ids"][-100:]  # the prompt lost its left end only
    assert loss_text(plain_tok, cut) == "the answer</s>"
    assert cut["prompt_mask"] == [1] * (100 - n_response) + [0] * n_response

    # a long response: the prompt keeps half the budget, the response loses its right end
    long = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x" * 300}]}
    cut = tokenize_record(long, plain_tok, max_seq_length=100)
    assert cut["input_ids"][:50] == full["input_ids"][n_prompt - 50: n_prompt]
    assert loss_text(plain_tok, cut) == "x" * 50 and sum(cut["prompt_mask"]) == 50

    # one token: the router needs a prompt token, so no response token fits -> dropped
    assert tokenize_record(record, plain_tok, max_seq_length=1) is None


def test_build_dataset_and_collator(chat_tok):
    dataset, stats = build_dataset(SNI, chat_tok, split="test", max_instances_per_task=3, max_seq_length=700)
    assert stats["records"] == stats["examples"] == len(dataset) == 21 * 3
    assert stats["skipped_bad"] == stats["dropped_too_long"] == 0
    assert 0 < stats["truncated"] < len(dataset)  # byte-level: the long SNI prompts are cut
    assert max(map(len, dataset["input_ids"])) == 700
    assert stats["loss_tokens"] == sum(sum(t != -100 for t in labels) for labels in dataset["labels"])
    assert dataset[0]["group"] == sorted(t.name for t in load_sni_tasks(SNI, "test"))[0]

    with pytest.raises(ValueError, match="dropped_too_long': 63"):
        build_dataset(SNI, chat_tok, split="test", max_instances_per_task=3, max_seq_length=1)

    features = [dataset[i] for i in range(3)]
    batch = SIMoECollator(byte_tokenizer(CHATML_SYSTEM_TEMPLATE, pad=True), pad_to_multiple_of=64)(features)
    length = -(-max(len(f["input_ids"]) for f in features) // 64) * 64
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask"}
    pads = {"input_ids": chat_tok.convert_tokens_to_ids("<pad>"), "attention_mask": 0, "labels": -100,
            "prompt_mask": 0}
    for key, pad in pads.items():
        assert batch[key].dtype == torch.long and batch[key].shape == (3, length)
        for row, f in zip(batch[key].tolist(), features, strict=True):
            assert row == f[key] + [pad] * (length - len(f[key]))
    no_pad = SIMoECollator(chat_tok)(features)["input_ids"]  # no pad token: eos, masked out anyway
    for row, f in zip(no_pad.tolist(), features, strict=True):
        assert row == f["input_ids"] + [chat_tok.eos_token_id] * (no_pad.shape[1] - len(f["input_ids"]))
    assert no_pad.shape[1] == max(len(f["input_ids"]) for f in features)
    # Trainer removes prompt_mask for models whose forward has no such argument (the plain baselines)
    plain = [{k: v for k, v in f.items() if k != "prompt_mask"} for f in features]
    assert set(SIMoECollator(chat_tok)(plain)) == {"input_ids", "attention_mask", "labels"}


# ---------------------------------------------------------------------------- bad input
BAD = [
    ({"instruction": "Hi", "input": ""}, "field 'output' is missing"),
    ({"instruction": "Hi", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "Hi", "output": "  "}, "field 'output' is empty"),
]


def test_bad_records_name_file_line_and_field(tmp_path, chat_tok):
    good = {"instruction": "Say hi", "output": "Hi"}
    for i, (bad, message) in enumerate(BAD):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, bad])
        with pytest.raises(ValueError, match=f"bad{i}.jsonl:line 2: {message}"):
            load_records(path)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")  # JSON Lines in a .json file
    with pytest.raises(ValueError, match="broken.json:line 2: invalid JSON line"):
        load_records(path)
    path = tmp_path / "array.json"
    turn = [{"role": "user", "content": "x"}]
    path.write_text(json.dumps([{"messages": MULTI_TURN}, {"messages": turn}]), encoding="utf-8")
    with pytest.raises(ValueError, match="array.json:index 1: field 'messages' must end with an assistant"):
        load_records(path)
    with pytest.raises(ValueError, match="array.json:index 0: field 'question' is missing"):
        load_records(path, prompt_field="question", response_field="answer")
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"gsm.jsonl:line 1: cannot tell the data format .*'answer'"):
        load_records(path)

    # skip_bad_records: every bad record of one file is skipped, counted and warned about
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, *[bad for bad, _ in BAD], good])
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, stats = build_dataset(path, chat_tok, skip_bad_records=True)
    assert stats["skipped_bad"] == 4 and stats["records"] == len(dataset) == 2
    assert [str(w.message).split(": ")[1] for w in caught if "skipping" in str(w.message)] == [
        f"{path}:line {n}" for n in (2, 3, 4, 6)]


def test_csv_and_parquet_read_like_json(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4", "category": "math"}, {"prompt": "Hi", "completion": ""}]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion", "category"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"d.csv:line 3: field 'completion' is empty"):
        load_records(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
    (record,) = load_records(tmp_path / "d.parquet")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert record == {"messages": messages, "group": "math", "origin": f"{tmp_path / 'd.parquet'}:index 0"}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")


def test_json_lines_break_only_at_newlines(tmp_path):
    """U+2028 and U+0085 inside a string (json.dumps(ensure_ascii=False) leaves them raw) are text,
    not line ends; Windows line ends parse too."""
    rows = [{"instruction": "a\u2028b", "output": "c\u0085d"}, {"instruction": "e", "output": "f"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    records = load_records(path)
    assert [r["messages"][0]["content"] for r in records] == ["a\u2028b", "e"]
    assert records[0]["messages"][1]["content"] == "c\u0085d"
    assert records[1]["origin"] == f"{path}:line 2"


def test_templates_that_cannot_be_trained_on_are_refused(chat_tok):
    record = {"messages": MULTI_TURN, "origin": "conv.jsonl:line 7"}
    # rewrites earlier turns (as "thinking" templates do): renders of prefixes are not prefixes
    rewriting = byte_tokenizer("{% for m in messages %}{{ m['content'] if loop.last else m['role'] }}"
                               "<|im_end|>{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(ValueError, match="conv.jsonl:line 7: .*not prefix-stable"):
        tokenize_record(record, rewriting, 4096)
    no_end = byte_tokenizer("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ValueError, match="conv.jsonl:line 7: .*without a special token"):
        tokenize_record(record, no_end, 4096)


def test_bad_sni_files_name_file_and_field(tmp_path):
    instances = [{"id": "a", "input": "x", "output": ["x"]}, {"id": "b", "input": "y", "output": "y"}]
    task = {"Definition": ["Copy."], "Categories": ["Misc."], "Positive Examples": [], "Instances": instances}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task9_copy.json").write_text(json.dumps(task), encoding="utf-8")
    with pytest.raises(ValueError, match=r"task9_copy.json: Instances\[1\]: field 'output' must be a non-"):
        load_records(tmp_path)
    with pytest.raises(ValueError, match=r"no split list splits/dev_tasks.txt"):
        load_sni_tasks(tmp_path, "dev")
