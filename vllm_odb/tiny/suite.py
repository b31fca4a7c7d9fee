"""The basic suite: synthetic instructions with exact-match answers of 1-25 characters.

The shipped tiny checkpoints were trained on it (at commit 7589191's trainer). Its answers are
too short and too determined to decode like a real model (one forward per block); the worked
suite (tiny/worked.py) replaces it for training. ``tiny/suites.py`` tells which suite a
checkpoint was trained on.

Every example is generated from a seed, so a held-out evaluation set is just another seed. The
answers run from 1 character (counting) to about 25 (addition with worked steps), which gives
the tiny models real end-of-answer decisions to make: where EOS starts is the response length.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _add(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition with the column sums written out: '47+38' -> '7+8=15, 4+3+1=8, so 85'."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    steps = f"{a % 10}+{b % 10}={ones}, " + (f"{a // 10}+{b // 10}+1={tens}" if carry else f"{a // 10}+{b // 10}={tens}")
    return f"What is {a}+{b}? Show the column sums.", f"{steps}, so {a + b}"


def _sort(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
    return f"Sort these letters: {' '.join(letters)}", " ".join(sorted(letters))


_WORDS = ("apple cloud river stone green tiger piano lemon house bread candle orbit sugar "
          "zebra quilt mango robot violet window garden planet silver frost maple").split()


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Reverse the word {word}.", word[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("abcd")
    text = "".join(rng.choice("abcd") for _ in range(rng.randint(4, 10)))
    return f"How many times does {letter} appear in {text}?", str(text.count(letter))


_NAMES = ("Sam", "Ann", "Bob", "Eva", "Tom", "Mia", "Leo", "Zoe")
_THINGS = ("apples", "pens", "books", "coins", "cards", "shells")


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", str(a + b)
    a = max(a, b + 1)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} now?", str(a - b)


TASKS = {"add": _add, "sort": _sort, "reverse": _reverse, "count": _count, "word": _word_problem}
LONGEST_ANSWER = 24  # "9+9=18, 9+9+1=19, so 198"-style answers; checked by a test
# What a command shows by default (tiny/suites.py ``showcase``), and a canvas its answers end in.
SHOWCASE = ("What is 47+38? Show the column sums.", "Sort these letters: q d m a", "Reverse the word planet.")
CANVAS = 128


def make_suite(seed: int, n: int, tasks: tuple[str, ...] | None = None) -> list[Example]:
    """``n`` examples cycling through the tasks, drawn from ``random.Random(seed)``."""
    from vllm_odb.tiny.suites import cycle_tasks

    makers = {name: (lambda rng, name=name, make=make: Example(name, *make(rng))) for name, make in TASKS.items()}
    return cycle_tasks(makers, seed, n, tasks)


def score(prediction: str, answer: str) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return prediction.strip() == answer


def check(prediction: str, ex: Example) -> dict[str, bool]:
    """The verifier's interface (tiny/suites.py): the answer has no steps to check apart from
    itself, so both verdicts are exact match."""
    ok = score(prediction, ex.answer)
    return {"final": ok, "steps": ok}
