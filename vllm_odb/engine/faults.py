"""Debug-only fault injection: a request's step fails on purpose, so a test can check that the
engine ends that request with an error and keeps serving the others
(``python -m vllm_odb.bench server-faults``, tests/test_faults.py).

Off unless the engine's processes run with ``VLLM_ODB_DEBUG_FAULTS=1`` (the server's environment;
its engine core inherits it). Then a request may carry ``extra_args={"debug_fault": "KIND[@N]"}``
(``vllm_xargs`` over HTTP), N being the request's forward the fault hits (1, the default: the
refresh that starts its first block; forwards are counted as the engine's ``forwards`` plus
``idle_forwards`` counters count them):

    nan    its logits are NaN from forward N on: the sampler finds non-finite logits and ends it
           with an error (engine/sampler.py)
    raise  its own part of the step raises at forward N: it ends with an error
    crash  the whole step raises at forward N, as a failing model runner would: the engine core
           dies (the server's ``/health`` then answers 503, and it shuts down)

Without the variable ``debug_fault`` is an unknown knob (HTTP 400), no request carries a fault,
and the sampler's only check is whether the table's set of faulty requests is empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "VLLM_ODB_DEBUG_FAULTS"
ARG = "debug_fault"  # the request's extra_args key
KINDS = ("nan", "raise", "crash")


class InjectedFault(RuntimeError):
    """What a ``raise`` or ``crash`` fault raises."""


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Fault:
    kind: str  # one of KINDS
    at: int = 1  # the request's forward it hits (1: its first)

    def due(self, forwards: int) -> bool:
        """Whether the forward after ``forwards`` (the request's forwards so far) is hit: from
        ``at`` on for ``nan`` (a broken request stays broken), only at ``at`` otherwise."""
        n = forwards + 1
        return n >= self.at if self.kind == "nan" else n == self.at

    def __str__(self) -> str:
        return f"{self.kind}@{self.at}"


def parse(value) -> Fault:
    """A request's ``debug_fault`` value -> ``Fault``; ``ValueError`` naming the key when debug
    faults are off or the value is malformed."""
    if not enabled():
        raise ValueError(f"{ARG}: debug fault injection is off (the server runs without {ENV}=1)")
    if not isinstance(value, str):
        raise ValueError(f"{ARG}={value!r}: a string 'KIND' or 'KIND@N', KIND one of {list(KINDS)}")
    kind, sep, at = value.partition("@")
    if kind not in KINDS:
        raise ValueError(f"{ARG}={value!r}: KIND is one of {list(KINDS)}")
    if sep and not (at.isascii() and at.isdigit() and 1 <= int(at) <= 1_000_000):
        raise ValueError(f"{ARG}={value!r}: N (the request's forward it hits) is an integer in [1, 1000000]")
    return Fault(kind, int(at) if at else 1)


def request_fault(extra_args: dict | None) -> Fault | None:
    """The request's fault, or None (always None with debug faults off)."""
    if not extra_args or ARG not in extra_args:
        return None
    return parse(extra_args[ARG])
