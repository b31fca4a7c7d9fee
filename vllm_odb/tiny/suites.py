"""Which synthetic suite a tiny checkpoint was trained on, and that suite's interface.

Two suites exist: ``basic`` (tiny/suite.py: short exact-match answers; the shipped checkpoints)
and ``worked`` (tiny/worked.py: long worked solutions whose wording is free, with a verifier).
Both give ``make_suite(seed, n, tasks)`` (examples with ``task``, ``prompt``, ``answer``) and
``check(prediction, example)`` -> ``{"final": bool, "steps": bool}``. A checkpoint names its suite
in ``training_log.json`` (``args.suite``); checkpoints without one were trained on ``basic``.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from types import ModuleType

SUITES = {"basic": "vllm_odb.tiny.suite", "worked": "vllm_odb.tiny.worked"}


def get(name: str) -> ModuleType:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {sorted(SUITES)}")
    return importlib.import_module(SUITES[name])


def suite_name(checkpoint: str) -> str:
    """The suite ``checkpoint`` (a directory) was trained on, from its training log."""
    path = os.path.join(checkpoint, "training_log.json")
    try:
        with open(path) as f:
            return json.load(f).get("args", {}).get("suite", "basic")
    except (OSError, ValueError):
        return "basic"


def for_checkpoint(checkpoint: str) -> ModuleType:
    return get(suite_name(checkpoint))


def showcase(checkpoint: str) -> tuple[tuple[str, ...], int]:
    """The questions a command answers when given none, and the canvas their answers end in, for
    ``checkpoint``'s suite (``SHOWCASE`` and ``CANVAS`` of the suite module): questions of another
    suite would be out of the checkpoint's distribution."""
    module = for_checkpoint(checkpoint)
    return module.SHOWCASE, module.CANVAS


def cycle_tasks(tasks: dict, seed: int, n: int, names: tuple[str, ...] | None = None) -> list:
    """``n`` examples cycling through ``names`` (default: every task of ``tasks``, a name -> maker
    of one example from a ``random.Random``), drawn from ``random.Random(seed)``."""
    names = tuple(names or tasks)
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(tasks)}")
    rng = random.Random(seed)
    return [tasks[names[i % len(names)]](rng) for i in range(n)]
