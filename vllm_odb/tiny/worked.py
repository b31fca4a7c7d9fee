"""A synthetic suite of worked problems: content fixed by the prompt, wording free.

Real dLLMs decode a few tokens per forward because a long answer's wording is not determined by
its prompt: which phrasing a step takes, where a sentence starts, what comes first when the order
is free. Each example here is a problem whose *content* (the facts, the numbers, the result of
every step) follows from the prompt, and whose *answer* is a worked solution of 60-400 tokens in
which every step has several phrasings of different lengths. A model trained on many renderings
learns the content confidently and the wording as a distribution, so threshold decoding commits
the determined tokens in parallel and has to choose, one forced commit at a time, where the
wording branches (``research/dynamics.md``'s yardstick: about 3 tokens per forward).

Five tasks, each a multi-step computation whose number of steps depends on the problem:
- ``chain``: follow cards from box to box to the one with the coin (pointer chasing, 8-18 hops);
- ``shop``: costs of several purchases (small products) and their running total;
- ``tally``: count the kinds in a numbered list item by item, restating the counts; the summary
  lists the kinds in any order;
- ``sort``: sort numbers by picking the smallest left each time;
- ``story``: a chain of gains and losses (+, -, small products).

Answers are written in a small template language: ``[a|b|c]`` picks one alternative (each equally
likely, an empty one allowed); a step is one of several such sentence templates. ``Step`` keeps
the alternatives, so the same content can be rendered anew (training) and its distribution
enumerated (``step_renderings``, used by tiny/oracle.py to compute what an ideal model would
decode). ``score`` is a verifier: the final answer, and every step whose arithmetic or lookup can
be checked, not string equality.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

_GROUP = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Step:
    """One step of a worked answer: its sentence templates (one is picked, then each ``[..|..]``
    group inside it)."""

    templates: tuple[str, ...]

    def render(self, rng: random.Random) -> str:
        return _render(rng.choice(self.templates), rng)


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # one rendering of ``steps`` (the one training and tests show)
    steps: tuple[Step, ...]
    truth: tuple  # what the verifier checks, per task (see score)

    def render(self, rng: random.Random) -> str:
        """Another wording of the same answer."""
        return "".join(s.render(rng) for s in self.steps)


def _render(template: str, rng: random.Random) -> str:
    return _GROUP.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def _expand(template: str) -> list[str]:
    parts = _GROUP.split(template)  # fixed, group, fixed, group, ...
    choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def step_renderings(step: Step) -> dict[str, float]:
    """Every wording of ``step`` with its probability (templates equally likely, then groups)."""
    out: dict[str, float] = {}
    for t in step.templates:
        texts = _expand(t)
        for text in texts:
            out[text] = out.get(text, 0.0) + 1.0 / (len(step.templates) * len(texts))
    return out


# ---------------------------------------------------------------------------------------- words

NAMES = ("Sam", "Ann", "Bob", "Eva", "Tom", "Mia", "Leo", "Zoe", "Max", "Ivy", "Ben", "Lily", "Noah", "Ruby",
         "Owen", "Emma")
BOXES = ("red", "blue", "green", "gold", "silver", "black", "white", "pink", "brown", "gray", "tan", "purple",
         "teal", "navy", "olive", "coral", "ivory", "amber", "jade", "rust", "sand", "mint", "rose", "cream", "khaki",
         "azure", "cyan", "beige", "wine")
FRUITS = (("apple", "apples"), ("pear", "pears"), ("plum", "plums"), ("lemon", "lemons"), ("peach", "peaches"),
          ("mango", "mangoes"), ("cherry", "cherries"), ("grape", "grapes"), ("melon", "melons"), ("kiwi", "kiwis"),
          ("fig", "figs"), ("lime", "limes"))
GOODS = (("pen", "pens"), ("book", "books"), ("cup", "cups"), ("hat", "hats"), ("sock", "socks"), ("card", "cards"),
         ("ball", "balls"), ("lamp", "lamps"), ("bowl", "bowls"), ("kite", "kites"), ("mug", "mugs"), ("bag", "bags"))
THINGS = ("apples", "marbles", "stickers", "coins", "shells", "stamps", "cookies", "pencils")
FRIENDS = NAMES


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _dollars(n: int) -> str:
    return f"{n} dollar" if n == 1 else f"{n} dollars"


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _example(task: str, prompt: str, steps: list[Step], truth: tuple, rng: random.Random) -> Example:
    steps = tuple(steps)
    return Example(task, prompt, "".join(s.render(rng) for s in steps), steps, truth)


# ---------------------------------------------------------------------------------------- tasks


def _chain(rng: random.Random) -> Example:
    """Pointer chasing: each box's card names the next box; the box with no card holds the coin.
    The prompt lists the path's cards in path order, with the other boxes' cards in between: each
    hop is a lookup of the current box's card, which a small model learns (with the cards shuffled,
    a trained model copied box names from its own answer instead; BENCHMARKS.md, the lookup probe)."""
    hops = rng.randint(8, 18)
    extra = rng.randint(1, 4)
    labels = rng.sample(BOXES, hops + 1 + extra)
    path, others = labels[:hops + 1], labels[hops + 1:]
    cards = [(path[i], path[i + 1]) for i in range(hops)]
    for o in others:  # a card off the path, anywhere among the path's cards
        cards.insert(rng.randrange(len(cards) + 1), (o, rng.choice([x for x in labels if x != o])))
    facts = " ".join(f"The {a} box has a card saying {b}." for a, b in cards)  # one form: a plain lookup
    start, end = path[0], path[-1]
    prompt = (f"Each box holds a card naming another box, except one box that holds a gold coin. {facts} Start "
              f"at the {start} box and follow the cards. Which box holds the coin?")
    steps = [Step((f"[We|I] start at the {start} box and follow the cards.",))]
    for a, b in zip(path, path[1:]):
        steps.append(Step((
            f" The card in the {a} box says {b}, so [we|I] open the {b} box[| next].",
            f" In the {a} box [is|we find] a card saying {b}, so we go to the {b} box.",
            f" [Next,|Then] the {a} box points us to the {b} box.",
        )))
    steps.append(Step((f" The {end} box has no card[| in it]: the coin is [there|in the {end} box]. "
                       f"The answer is {end}.",)))
    return _example("chain", prompt, steps, (end, tuple(path)), rng)


def _shop(rng: random.Random) -> Example:
    """Costs of several purchases (quantity x price), then their running total."""
    while True:
        goods = rng.sample(GOODS, rng.randint(5, 8))
        buys = [(rng.randint(1, 3), rng.randint(1, 5), g) for g in goods]
        total = sum(q * p for q, p, _ in buys)
        if total <= 60:
            break
    name = rng.choice(NAMES)
    listed = [f"{_article(one)} {one} for {_dollars(p)}" if q == 1 else f"{q} {many} at {_dollars(p)} each"
              for q, p, (one, many) in buys]
    prompt = f"{name} buys {_listing(listed)}. How many dollars does {name} spend in all?"
    steps = [Step(("[We|I] work out the cost of each item first.",))]
    costs = []
    for q, p, (one, many) in buys:
        c = q * p
        costs.append(c)
        if q == 1:
            steps.append(Step((f" The {one} costs {_dollars(p)}.", f" One {one} is {_dollars(p)}.")))
        else:
            steps.append(Step((
                f" {q} {many} at {_dollars(p)} each cost {q} times {p}, which is {c} dollars.",
                f" The {many} cost {q} times {p}, [which is|that is] {c} dollars.",
                f" For the {many}, {q} times {p} is {c} dollars.",
            )))
    steps.append(Step((" Now [we|I] add the costs up.",)))
    running = costs[0] + costs[1]
    steps.append(Step((f" {costs[0]} plus {costs[1]} is {running}.", f" {costs[0]} and {costs[1]} make {running}.")))
    for c in costs[2:]:
        new = running + c
        steps.append(Step((f" Adding {c} [gives|makes] {new}.", f" {running} plus {c} is {new}.")))
        running = new
    steps.append(Step((f" [So|In all,] {name} spends {total} dollars. The answer is {total}.",)))
    return _example("shop", prompt, steps, (total, tuple(costs)), rng)


def _tally(rng: random.Random) -> Example:
    """Count each kind in a numbered list, item by item, each step restating every count so far
    (so a step follows from the one before and its item); the summary names the kinds in any order."""
    kinds = rng.sample(FRUITS, rng.randint(2, 3))
    items = [rng.choice(kinds) for _ in range(rng.randint(10, 18))]
    for k in kinds:  # every kind appears
        if k not in items:
            items[rng.randrange(len(items))] = k
    listed = ", ".join(f"item {i}: {one}" for i, (one, _) in enumerate(items, 1))
    prompt = f"Count each kind of fruit in this list: {listed}."
    plural = {one: many for one, many in kinds}

    def counted(counts: dict[str, int]) -> str:
        return _listing([f"{c} {k if c == 1 else plural[k]}" for k, c in counts.items()])

    steps = [Step(("[We|I] go through the list one by one.",))]
    counts: dict[str, int] = {}
    for i, (one, many) in enumerate(items, 1):
        counts[one] = counts.get(one, 0) + 1
        a, state = _article(one), counted(counts)
        steps.append(Step((
            f" Item {i} is {a} {one}, so [we have|that makes] {state}.",
            f" Item {i}, {a} {one}: {state} so far.",
            f" [Next,|Then] item {i} is {a} {one}, [giving|bringing us to] {state}.",
        )))
    first_seen = list(counts)
    orders = itertools.permutations(first_seen) if len(first_seen) <= 4 else [tuple(first_seen)]
    summaries = [_listing([f"{counts[k]} {k if counts[k] == 1 else plural[k]}" for k in order]) for order in orders]
    steps.append(Step(tuple(f" [So|In total] there are {s}." for s in summaries)))
    return _example("tally", prompt, steps, (tuple(sorted(counts.items())), tuple(one for one, _ in items)), rng)


def _sort(rng: random.Random) -> Example:
    """Sort by taking the smallest number left each time."""
    nums = rng.sample(range(1, 61), rng.randint(10, 18))
    order = sorted(nums)
    prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
    steps = [Step(("[We|I] pick the smallest number left each time.",)),
             Step((f" The smallest is {order[0]}.", f" First [comes|is] {order[0]}."))]
    for prev, v in zip(order, order[1:]):
        steps.append(Step((f" [Next|Then] [comes|is] {v}.", f" After {prev} [comes|is] {v}.")))
    listed = ", ".join(map(str, order))
    steps.append(Step((f" [So|Sorted,] the list is {listed}. The answer is {listed}.",)))
    return _example("sort", prompt, steps, tuple(order), rng)


_GAIN = ("buys {x} more", "finds {x} more", "gets {x} from {f}")
_LOSS = ("gives {x} to {f}", "loses {x}", "eats {x}")


def _story(rng: random.Random) -> Example:
    """A chain of gains and losses, each step written as its arithmetic."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    f = rng.choice([n for n in NAMES if n != name])
    have = rng.randint(5, 25)
    start = have
    sentences, steps = [], [Step((f"{name} starts with {have} {thing}.",))]
    for _ in range(rng.randint(8, 12)):
        kind = "gain" if have < 5 else rng.choice(("gain", "loss", "bags") if have < 32 else ("loss",))
        if kind == "bags" and have <= 28:
            k, m = rng.randint(2, 3), rng.randint(2, 4)
            new = have + k * m
            sentences.append(f"Then {name} gets {k} bags with {m} {thing} in each.")
            steps.append(Step((
                f" {k} bags of {m} make {k} times {m} = {k * m}, so {have} + {k * m} = {new}.",
                f" The bags hold {k} times {m} = {k * m}, so {name} has {have} + {k * m} = {new}.",
            )))
        elif kind in ("gain", "bags"):
            x = rng.randint(1, min(8, 40 - have))
            new = have + x
            sentences.append(f"Then {name} " + rng.choice(_GAIN).format(x=x, f=f) + ".")
            steps.append(Step((
                f" Adding {x} more [makes|gives] {have} + {x} = {new}.",
                f" After that {name} [has|owns] {have} + {x} = {new}.",
                f" {name} gains {x}[, so|:] {have} + {x} = {new}.",
            )))
        else:
            x = rng.randint(1, min(8, have))
            new = have - x
            sentences.append(f"Then {name} " + rng.choice(_LOSS).format(x=x, f=f) + ".")
            steps.append(Step((
                f" Losing {x} leaves {have} - {x} = {new}.",
                f" After that {name} [has|owns] {have} - {x} = {new}.",
                f" {name} gives away {x}[, so|:] {have} - {x} = {new}.",
            )))
        have = new
    prompt = f"{name} has {start} {thing}. {' '.join(sentences)} How many {thing} does {name} have now?"
    steps.append(Step((f" [So|In the end] {name} has {have} {thing}. The answer is {have}.",)))
    return _example("story", prompt, steps, (have, start), rng)


TASKS = {"chain": _chain, "shop": _shop, "tally": _tally, "sort": _sort, "story": _story}


def make_suite(seed: int, n: int, tasks: tuple[str, ...] | None = None) -> list[Example]:
    """``n`` examples cycling through the tasks, drawn from ``random.Random(seed)``."""
    from vllm_odb.tiny.suites import cycle_tasks

    return cycle_tasks(TASKS, seed, n, tasks)


# What a command shows by default (tiny/suites.py ``showcase``): held-out questions of the tasks with
# the shortest prompts; and a canvas the answers end in (92-335 tokens, the #19 tables' gen 512).
SHOWCASE = tuple(e.prompt for e in make_suite(0, 3, ("sort", "shop", "story")))
CANVAS = 512


# ---------------------------------------------------------------------------------------- verifier

_NUM = re.compile(r"\d+")
_ARITH = re.compile(r"(\d+) (\+|-|times|plus) (\d+),? (?:=|is|which is|that is|gives) (\d+)"
                    r"|(\d+) and (\d+) make (\d+)")
_OPS = {"+": lambda a, b: a + b, "plus": lambda a, b: a + b, "-": lambda a, b: a - b, "times": lambda a, b: a * b}


def _final_number(text: str) -> int | None:
    m = re.search(r"The answer is (\d+)\.?$", text)
    return int(m.group(1)) if m else None


def check(prediction: str, ex: Example) -> dict[str, bool]:
    """The verifier. ``final``: the final answer is right. ``steps``: so is every step that can be
    checked: each ``a + b = c`` / ``a - b = c`` / ``a times b = c`` / ``a plus b is c`` is true,
    and per task the visited boxes follow the cards, the running counts count the list, the picked
    numbers come in sorted order, the story's steps continue from each other."""
    text = prediction.strip()
    final, steps = _CHECKS[ex.task](text, ex)
    return {"final": final, "steps": final and steps and _arithmetic_holds(text)}


def score(prediction: str, ex: Example) -> bool:
    """The verifier's verdict: the final answer and every checkable step are right."""
    return check(prediction, ex)["steps"]


def _arithmetic_holds(text: str) -> bool:
    for m in _ARITH.finditer(text):
        if m.group(1) is not None:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        else:
            a, op, b, c = int(m.group(5)), "+", int(m.group(6)), int(m.group(7))
        if _OPS[op](a, b) != c:
            return False
    return True


def _check_chain(text: str, ex: Example) -> tuple[bool, bool]:
    end, path = ex.truth
    visited = [a or b for a, b in re.findall(r"(?:open|go to) the (\w+) box|us to the (\w+) box", text)]
    m = re.search(r"The answer is (\w+)\.?$", text)
    return m is not None and m.group(1) == end, visited == list(path[1:])


def _check_shop(text: str, ex: Example) -> tuple[bool, bool]:
    total, _costs = ex.truth
    return _final_number(text) == total, True


_TALLY_STEP = re.compile(r"[Ii]tem (\d+)(?: is|,) an? (\w+)(?:, so (?:we have|that makes)|:|, (?:giving|bringing us to)) "
                         r"([^.]*?)(?: so far)?\.")


def _counts(text: str) -> dict[str, int]:
    plural = {many: one for one, many in FRUITS}
    return {plural.get(w, w): int(c) for c, w in re.findall(r"(\d+) (\w+)", text)}


def _check_tally(text: str, ex: Example) -> tuple[bool, bool]:
    counts, items = ex.truth
    summary = text.rsplit(" there are ", 1)[-1] if " there are " in text else ""
    running: dict[str, int] = {}
    seen, ok = [], True
    for m in _TALLY_STEP.finditer(text):
        index, kind, state = int(m.group(1)), m.group(2), m.group(3)
        running[kind] = running.get(kind, 0) + 1
        seen.append(kind)
        ok &= index == len(seen) and _counts(state) == running
    return _counts(summary) == dict(counts), ok and seen == list(items)


def _check_sort(text: str, ex: Example) -> tuple[bool, bool]:
    order = list(ex.truth)
    m = re.search(r"The answer is ([\d, ]+)\.?$", text)
    final = m is not None and [int(x) for x in _NUM.findall(m.group(1))] == order
    picked = [int(next(g for g in m.groups() if g)) for m in re.finditer(
        r"The smallest is (\d+)\.|First (?:comes|is) (\d+)\.|(?:Next|Then) (?:comes|is) (\d+)\."
        r"|After \d+ (?:comes|is) (\d+)\.", text)]
    return final, picked == order


def _check_story(text: str, ex: Example) -> tuple[bool, bool]:
    final, start = ex.truth
    have, ok = start, True
    for a, _op, _b, c in re.findall(r"(\d+) (\+|-) (\d+) = (\d+)", text):
        ok &= int(a) == have
        have = int(c)
    return _final_number(text) == final, ok and have == final


_CHECKS = {"chain": _check_chain, "shop": _check_shop, "tally": _check_tally, "sort": _check_sort,
           "story": _check_story}
