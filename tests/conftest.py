"""Test-run wiring: tests marked ``slow`` (long decodes of the shipped checkpoints) are skipped by
default, so the default run (``python -m pytest -m "not gpu" -q``) stays short on a 2-core CPU.
They run when ``VLLM_ODB_SLOW=1`` is set (``.ci/run`` sets it, so CI runs every test) or when the
command line selects them with a ``-m`` expression naming ``slow`` (``-m slow``, ``-m "slow and
not gpu"``)."""

from __future__ import annotations

import os

import pytest

SLOW_ENV = "VLLM_ODB_SLOW"


def _slow_wanted(config: pytest.Config) -> bool:
    if os.environ.get(SLOW_ENV, "").strip() not in ("", "0"):
        return True
    markexpr = config.getoption("markexpr", "") or ""
    return "slow" in markexpr.replace("not slow", "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _slow_wanted(config):
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_ENV}=1 (as .ci/run does) or select with -m slow to run it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
