"""The synthetic suite as lm-eval documents, scored by the suite's verifier.

A document is one example of ``suites.get(suite).make_suite(seed, size, tasks)``: the prompts
``python -m vllm_odb.bench quality --seed S --limit N [--tasks ...]`` decodes are the first N
documents of the suite at ``seed`` (``make_suite`` draws its examples one after another from one
seeded generator, so the first N of a longer suite are the suite of N; lm-eval's ``--limit N``
takes them). The score of an answer is that command's: ``accuracy`` is the verifier's ``steps``
verdict (the final answer and every checkable step right), ``final_accuracy`` its ``final``
verdict.

Which suite: ``suite`` (``basic`` or ``worked``) if given, else the one ``checkpoint`` was trained
on (``suites.suite_name``), else, when lm-eval's model argument (``model`` / ``pretrained``, merged
into the task's metadata by lm-eval's command line) is a checkpoint directory, that one's, else
``basic`` (the shipped tiny checkpoints'). The names are set with lm-eval's ``--metadata``, e.g.
``--metadata '{"suite_seed": 0, "checkpoint": "checkpoints/tiny-dream"}'``.

Pure Python (no lm-eval import): tasks/utils.py wraps these for lm-eval.
"""

from __future__ import annotations

import os
from functools import lru_cache

DEFAULT_SEED = 0  # bench quality's --seed default
DEFAULT_SIZE = 100  # bench quality's --limit default; lm-eval's --limit takes fewer


def resolve_suite(suite: str | None = None, checkpoint: str | None = None, model: str | None = None,
                  pretrained: str | None = None) -> str:
    """The suite's name (see the module docstring for the order)."""
    from vllm_odb.tiny import suites

    if suite:
        suites.get(suite)  # a ValueError naming the choices
        return suite
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"checkpoint={checkpoint!r} is not a checkpoint directory")
        return suites.suite_name(checkpoint)
    for path in (model, pretrained):
        if isinstance(path, str) and os.path.isdir(path):
            return suites.suite_name(path)
    return "basic"


def _tasks_key(tasks) -> tuple[str, ...] | None:
    if not tasks:
        return None
    if isinstance(tasks, str):
        return tuple(t for t in tasks.split(",") if t)
    return tuple(tasks)


@lru_cache(maxsize=8)
def _suite(suite: str, seed: int, size: int, tasks: tuple[str, ...] | None) -> tuple:
    from vllm_odb.tiny import suites

    return tuple(suites.get(suite).make_suite(seed, size, tasks))


def suite_docs(suite: str | None = None, checkpoint: str | None = None, suite_seed: int = DEFAULT_SEED,
               suite_size: int = DEFAULT_SIZE, suite_tasks=None, model: str | None = None,
               pretrained: str | None = None, **_other) -> list[dict]:
    """The documents: one dict per example, holding what locates it in its suite (``suite``,
    ``suite_seed``, ``suite_size``, ``suite_tasks``, ``index``) and its ``task``, ``prompt`` and
    ``answer`` (one right answer; the verifier accepts others for the worked suite). ``_other``
    takes the rest of lm-eval's metadata (its task version, the model's arguments)."""
    name = resolve_suite(suite, checkpoint, model, pretrained)
    seed, size, tasks = int(suite_seed), int(suite_size), _tasks_key(suite_tasks)
    if size < 1:
        raise ValueError(f"suite_size={size}: must be at least 1")
    return [{"suite": name, "suite_seed": seed, "suite_size": size, "suite_tasks": ",".join(tasks or ()),
             "index": i, "task": ex.task, "prompt": ex.prompt, "answer": ex.answer}
            for i, ex in enumerate(_suite(name, seed, size, tasks))]


def example_for(doc: dict):
    """The suite's example behind ``doc`` (what its verifier checks against)."""
    ex = _suite(doc["suite"], int(doc["suite_seed"]), int(doc["suite_size"]),
                _tasks_key(doc["suite_tasks"]))[int(doc["index"])]
    if ex.prompt != doc["prompt"]:
        raise ValueError(f"document {doc['index']} does not match its suite's example (prompt {doc['prompt']!r})")
    return ex


def score(doc: dict, prediction: str) -> dict[str, float]:
    """``bench quality``'s verdicts on one answer: ``accuracy`` (the verifier's ``steps``) and
    ``final_accuracy`` (its ``final``), as 0.0 / 1.0."""
    from vllm_odb.tiny import suites

    verdict = suites.get(doc["suite"]).check(prediction, example_for(doc))
    return {"accuracy": float(verdict["steps"]), "final_accuracy": float(verdict["final"])}
