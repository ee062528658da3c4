import datetime
import random
import re
import string
from decimal import Decimal

import pytest

from simoe.data import synthetic as st


def _fields(text: str) -> dict[str, str]:
    return dict(item.split(": ", 1) for item in text.split("; "))


def _weekday_after(day: str, n: int) -> str:
    monday = datetime.date(2024, 1, 1)  # a Monday
    start = monday + datetime.timedelta(days=st.WEEKDAYS.index(day))
    return (start + datetime.timedelta(days=n)).strftime("%A")


_SHIFT = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a")

# An independent recomputation of every family's answer from its prompt text alone.
CHECKS = {
    "add": (r"Add: (\d+) \+ (\d+)", lambda a, b: str(int(a) + int(b))),
    "subtract": (r"Subtract: (\d+) - (\d+)", lambda a, b: str(int(a) - int(b))),
    "sort_numbers": (r"Sort ascending: ([\d ]+)",
                     lambda s: " ".join(str(n) for n in sorted(int(x) for x in s.split()))),
    "reverse": (r"Reverse the word: ([a-z]+)", lambda w: "".join(reversed(w))),
    "remove_vowels": (r"Remove the vowels: ([a-z]+)", lambda w: re.sub("[aeiou]", "", w)),
    "caesar": (r"Shift each letter forward by one: ([a-z]+)", lambda w: w.translate(_SHIFT)),
    "m_to_cm": (r"Convert to centimetres: (\d\.\d\d) m", lambda x: str(int(Decimal(x) * 100))),
    "weekday": (r"Which weekday is it\? (\w+) \+ (\d+) days", lambda d, n: _weekday_after(d, int(n))),
    "count_letters": (r"Count the letter: '([a-z])' in ([a-z]+)",
                      lambda c, w: str(sum(ch == c for ch in w))),
    "extract": (r"Extract the field: '(\w+)' from (.+)", lambda k, text: _fields(text)[k]),
    "sort_letters": (r"Sort the letters: ([a-z ]+)", lambda s: " ".join(sorted(s.split()))),
    "km_to_m": (r"Convert to metres: (\d\.\d\d) km", lambda x: str(int(Decimal(x) * 1000))),
}


def test_every_family_has_an_independent_check():
    assert set(CHECKS) == set(st.FAMILIES)
    assert len(st.FAMILIES) >= 8


@pytest.mark.parametrize("family", sorted(st.FAMILIES))
def test_answers_are_correct(family):
    pattern, solve = CHECKS[family]
    rng = random.Random(123)
    for _ in range(200):
        prompt, answer = st.FAMILIES[family].generate(rng)
        assert prompt.startswith(st.FAMILIES[family].instruction + " ")
        match = re.fullmatch(pattern, prompt)
        assert match, prompt
        assert answer == solve(*match.groups()), prompt


def test_instructions_tell_families_apart():
    instructions = [f.instruction for f in st.FAMILIES.values()]
    assert len(set(instructions)) == len(instructions)


def test_records_format_and_interleaving():
    records = st.make_records("train", seed=0, n_per_family=3)
    assert len(records) == 3 * len(st.SEEN)
    assert [r["group"] for r in records[: len(st.SEEN)]] == list(st.SEEN)
    for i, r in enumerate(records):
        assert r["origin"] == f"simoe:synthetic:train:{i}"
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].startswith(st.FAMILIES[r["group"]].instruction)


def test_deterministic_given_the_seed():
    assert st.make_records("test", seed=3) == st.make_records("test", seed=3)
    assert st.make_records("test", seed=3) != st.make_records("test", seed=4)


def test_splits_are_disjoint_whatever_the_seeds():
    train = {r["messages"][0]["content"] for seed in (0, 1) for r in st.make_records("train", seed=seed)}
    test = {r["messages"][0]["content"] for seed in (0, 1) for r in st.make_records("test", seed=seed)}
    assert len(test) > 300
    assert not train & test


def test_prompts_are_distinct_within_a_split():
    for split in st.SPLITS:
        prompts = [r["messages"][0]["content"] for r in st.make_records(split)]
        assert len(prompts) == len(set(prompts))


def test_held_out_families_never_in_train_or_test():
    assert len(st.HELD_OUT) == 2 and set(st.HELD_OUT) <= set(st.FAMILIES)
    for split in ("train", "test"):
        assert {r["group"] for r in st.make_records(split)} == set(st.SEEN)
    assert {r["group"] for r in st.make_records("heldout")} == set(st.HELD_OUT)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        st.make_records("validation")
    with pytest.raises(ValueError, match="n_per_family"):
        st.make_records("train", n_per_family=0)
    with pytest.raises(ValueError, match="fewer than"):
        st.make_records("test", n_per_family=300)
