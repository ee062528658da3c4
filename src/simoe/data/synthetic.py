"""Synthetic instruction families with exact answers, for the demo and the tests.

Every family has one fixed instruction phrasing (so a router can tell families apart from the
prompt alone) and short answers (a few tokens), so a small model learns them in a few hundred
steps on a CPU and exact match measures it. ``HELD_OUT`` families are never trained on: they show
what transfers (the answer format, related skills) and what does not.

Records use the project's normalised format::

    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
     "group": family, "origin": "simoe:synthetic:<split>:<i>"}
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass

WORDS = (
    "apple", "bread", "chair", "cloud", "dance", "eagle", "flame", "grape", "house", "juice",
    "knife", "lemon", "money", "night", "ocean", "piano", "queen", "river", "snake", "table",
    "tiger", "water", "zebra", "brick", "candle", "garden", "jacket", "kitten", "ladder", "mirror",
    "pencil", "rabbit", "silver", "ticket", "window", "basket", "button", "carpet", "dinner",
    "forest", "hammer", "island", "market", "orange", "pepper", "rocket", "summer", "tunnel",
    "violin", "winter", "yellow", "planet", "castle", "bottle", "cookie", "doctor", "engine",
    "finger", "guitar", "helmet", "monkey", "number", "pocket", "salmon", "spider", "stone",
    "storm", "train", "truck", "wheel", "horse", "mouse", "plant", "sugar", "metal", "paper",
    "glass", "shirt", "sheep", "beach", "camel", "dream", "field", "ghost", "heart", "jewel",
    "lunch", "magic", "nurse", "pilot", "radio", "robot", "smile", "sword", "tooth", "voice",
    "wagon", "anchor", "bridge", "circle", "flower", "ginger", "kettle", "lizard", "meadow",
    "parrot", "pickle", "puzzle", "saddle", "tomato", "turtle", "walnut", "wizard", "badge",
    "cabin", "crown", "desk", "drum", "frog", "gold", "kite", "lamp", "milk", "nest", "pond",
    "rain", "ship", "star", "tent", "wolf", "yard", "bench", "coral", "fence", "honey", "melon",
    "olive", "peach", "shell", "thumb", "towel", "whale", "acorn", "actor", "album", "alarm",
    "angel", "ankle", "apron", "arrow", "atlas", "bacon", "bagel", "banjo", "barn", "beard",
    "berry", "bison", "blade", "blanket", "bonnet", "border", "bucket", "bullet", "cactus", "canal",
    "canoe", "carrot", "cattle", "cellar", "cereal", "cherry", "chess", "chicken", "cobra", "comet",
    "copper", "cotton", "cousin", "crayon", "cricket", "daisy", "dentist", "diamond", "dragon",
    "elbow", "falcon", "feather", "fiddle", "flute", "fossil", "gravel", "harbor", "hazel",
    "hockey", "igloo", "iron", "ivory", "jaguar", "jelly", "jungle", "kayak", "koala", "lantern",
    "leopard", "lily", "llama", "lobster", "locket", "lotus", "magnet", "mango", "maple", "marble",
    "meteor", "mitten", "moose", "muffin", "napkin", "needle", "noodle", "oyster", "paddle",
    "panda", "parcel", "pebble", "pillow", "pirate", "plum", "poncho", "pumpkin", "quilt", "raven",
    "ribbon", "saucer", "scarf", "shovel", "sled", "socket", "spoon", "squid", "statue", "stove",
    "tablet", "teapot", "thread", "timber", "toast", "tulip", "valley", "velvet", "wallet",
    "walrus", "weasel", "willow", "yogurt", "bamboo", "banana", "beaver", "blossom", "cabbage",
    "canyon", "cavern", "cobweb", "donkey", "goblin", "hamster", "insect", "kernel", "lagoon",
    "mammal", "nickel", "oatmeal", "orchid", "pasta", "peanut", "prism", "quartz", "rascal",
    "sandal", "shadow", "sponge", "sprout", "summit", "teacup", "tennis", "thimble", "tractor",
    "trumpet", "vessel", "waffle", "zipper",
)
NAMES = ("Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kira", "Luca", "Maya", "Nils", "Omar", "Paula", "Ravi", "Sofia", "Tomas", "Yuki")
CITIES = ("Lima", "Oslo", "Paris", "Rome", "Cairo", "Dublin", "Lagos", "Madrid", "Quito", "Seoul",
          "Tokyo", "Vienna", "Berlin", "Delhi", "Lisbon", "Prague", "Sydney", "Toronto", "Nairobi")
JOBS = ("baker", "nurse", "pilot", "farmer", "painter", "teacher", "lawyer", "chef", "tailor")
FIELDS = ("name", "city", "age", "job")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
VOWELS = set("aeiou")


@dataclass(frozen=True)
class Family:
    """A task family: its fixed instruction and a generator of (prompt, answer) pairs."""

    instruction: str
    generate: Callable[[random.Random], tuple[str, str]]


def _family(instruction: str, make: Callable[[random.Random], tuple[str, str]]) -> Family:
    """``make`` returns (input text, answer); the prompt is the instruction, then the input."""

    def generate(rng: random.Random) -> tuple[str, str]:
        text, answer = make(rng)
        return f"{instruction} {text}", answer

    return Family(instruction, generate)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} - {b}", str(a - b)


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 4)
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word[::-1]


def _remove_vowels(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, "".join(c for c in word if c not in VOWELS)


def _caesar(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)


def _m_to_cm(rng: random.Random) -> tuple[str, str]:
    cm = rng.randint(101, 999)
    return f"{cm // 100}.{cm % 100:02d} m", str(cm)


def _weekday(rng: random.Random) -> tuple[str, str]:
    day, n = rng.randrange(7), rng.randint(2, 60)
    return f"{WEEKDAYS[day]} + {n} days", WEEKDAYS[(day + n) % 7]


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word, letter = rng.choice(WORDS), rng.choice("aeiorst")
    return f"'{letter}' in {word}", str(word.count(letter))


def _extract(rng: random.Random) -> tuple[str, str]:
    record = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "age": str(rng.randint(18, 90)),
              "job": rng.choice(JOBS)}
    key = rng.choice(FIELDS)
    text = "; ".join(f"{k}: {v}" for k, v in record.items())
    return f"'{key}' from {text}", record[key]


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(string.ascii_lowercase, 5)
    return " ".join(letters), " ".join(sorted(letters))


def _km_to_m(rng: random.Random) -> tuple[str, str]:
    m = 10 * rng.randint(101, 999)  # 1.01 .. 9.99 km: decimals, so the answer is not "append 000"
    return f"{m // 1000}.{m % 1000 // 10:02d} km", str(m)


FAMILIES: dict[str, Family] = {
    "add": _family("Add:", _add),
    "subtract": _family("Subtract:", _subtract),
    "sort_numbers": _family("Sort ascending:", _sort_numbers),
    "reverse": _family("Reverse the word:", _reverse),
    "remove_vowels": _family("Remove the vowels:", _remove_vowels),
    "caesar": _family("Shift each letter forward by one:", _caesar),
    "m_to_cm": _family("Convert to centimetres:", _m_to_cm),
    "weekday": _family("Which weekday is it?", _weekday),
    "count_letters": _family("Count the letter:", _count_letters),
    "extract": _family("Extract the field:", _extract),
    "sort_letters": _family("Sort the letters:", _sort_letters),
    "km_to_m": _family("Convert to metres:", _km_to_m),
}
# Never trained on: km_to_m resembles m_to_cm (a unit conversion: does that transfer?),
# sort_letters resembles sort_numbers (same operation on other symbols).
HELD_OUT: tuple[str, ...] = ("km_to_m", "sort_letters")
SEEN: tuple[str, ...] = tuple(f for f in FAMILIES if f not in HELD_OUT)
SPLITS = ("train", "test", "heldout")
DEFAULT_N_PER_FAMILY = {"train": 128, "test": 32, "heldout": 32}
_TEST_BUCKETS = 4  # a prompt belongs to "test" iff crc32(prompt) % 4 == 0, else to "train"


def _in_split(prompt: str, split: str) -> bool:
    """Train and test prompts come from disjoint parts of the prompt space (3/4, 1/4), whatever the seed.

    Different seeds alone cannot keep small families (e.g. 413 weekday prompts) disjoint; a stable
    hash of the prompt text (crc32, not ``hash``, which varies per process) can.
    """
    if split == "heldout":
        return True
    is_test = zlib.crc32(prompt.encode("utf-8")) % _TEST_BUCKETS == 0
    return is_test == (split == "test")


def _sample(family: str, split: str, seed: int, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs of ``family`` that belong to ``split``."""
    rng = random.Random(f"simoe:{seed}:{split}:{family}")  # str seeds are hashed stably (sha512)
    generate = FAMILIES[family].generate
    seen: set[str] = set()
    pairs = []
    misses = 0
    while misses < 10_000:  # rejection sampling; give up once new prompts stop coming
        prompt, answer = generate(rng)
        if prompt in seen or not _in_split(prompt, split):
            misses += 1
            continue
        seen.add(prompt)
        pairs.append((prompt, answer))
        if len(pairs) == n:
            return pairs
        misses = 0
    raise ValueError(f"family {family!r} has fewer than {n} distinct {split!r} prompts; "
                     "lower n_per_family")


def make_records(split: str = "train", seed: int = 0, n_per_family: int | None = None) -> list[dict]:
    """Records of ``split``: "train"/"test" (seen families, disjoint prompts) or "heldout".

    Families are interleaved (one example of each in turn), so any prefix is balanced.
    Deterministic given (split, seed, n_per_family); ``n_per_family`` defaults to
    ``DEFAULT_N_PER_FAMILY[split]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = DEFAULT_N_PER_FAMILY[split] if n_per_family is None else n_per_family
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_per_family must be a positive integer, got {n_per_family!r}")
    families = HELD_OUT if split == "heldout" else SEEN
    samples = {family: _sample(family, split, seed, n) for family in families}
    records = []
    for j in range(n):
        for family in families:
            prompt, answer = samples[family][j]
            records.append({
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer}],
                "group": family,
                "origin": f"simoe:synthetic:{split}:{len(records)}",
            })
    return records
