"""The engine's step profiler (``VLLM_ODB_PROFILE=path``; benchmarks only).

The sampler (engine/sampler.py) takes it as its step observer when the variable is set in the
engine process (``vllm_odb.engine.step_observer``): it appends one JSON line per engine step to
``path``, with the time since the previous step ended (``step_s``), the time of the refresh phase
(``refresh_s``), the decode and refresh requests, the tokens the refreshes processed and the keys
the decode rows attended, and the runner's batch (``tokens``, ``reqs``), and on a GPU the caching allocator's work in the step
(``alloc_retries``: allocations that freed cached blocks and retried, each a device sync;
``device_mallocs``: cudaMalloc calls; from ``torch.cuda.memory_stats``, a host read). ``bench speed`` and
``bench vllm-full-size`` read it (decode-only and refresh-only steps against the GPU's ceilings).

On a GPU the times are the device's: CUDA events recorded in the stream where the refresh phase
starts and where the step ends, read once the device has passed them. The profiler never waits for
the device, so the host runs ahead as it does when serving (the sampler's overlap). A step's line is
written once its events have completed, and all of them when a request ends (one device sync a
request, not a step). On the CPU the times are the host's.
"""

from __future__ import annotations

import json
import time

import torch


class _Clock:
    """A point in the step's time: a CUDA timing event on a GPU, else the host's clock."""

    def __init__(self):
        self.event = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.host = time.perf_counter()

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def seconds_since(self, earlier: "_Clock") -> float:
        if self.event is None:
            return self.host - earlier.host
        return earlier.event.elapsed_time(self.event) / 1e3


ALLOC_KEYS = {"alloc_retries": "num_alloc_retries", "device_mallocs": "num_device_alloc"}


def allocator_counts() -> dict[str, int]:
    """The caching allocator's cumulative counters this profiler reports per step (empty off CUDA)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats_as_nested_dict()  # the counters are top-level: no flattening
    return {k: int(stats.get(v, 0)) for k, v in ALLOC_KEYS.items()}


class StepProfiler:
    def __init__(self, path: str):
        self.path = path
        self._alloc = allocator_counts()
        self._last_end: _Clock | None = None
        self._refresh_start: _Clock | None = None
        self._waiting: list[tuple[dict, _Clock | None, _Clock]] = []  # lines whose events are not done yet

    def refresh_started(self) -> None:
        self._refresh_start = _Clock()

    def step_ended(self, report) -> None:
        """``report``: the sampler's ``StepReport`` (the batch, the decoded and refreshed requests,
        whether a request ended: vLLM may take no further step, so every line is written now)."""
        batch = report.input_batch
        row = {"decode_reqs": len(report.decoded), "refresh_reqs": len(report.refreshed),
               # the tokens the refresh ran: an ALP cut later in the step shrinks q.keys (session 14's
               # batch-8 "4x roofline" refresh steps were measured against the cut canvases)
               "refresh_tokens": report.refresh_tokens,
               "kv_tokens": sum(q.keys for q in report.decoded),
               "tokens": int(batch.num_tokens), "reqs": int(batch.num_reqs)}
        alloc = allocator_counts()
        row.update({k: v - self._alloc.get(k, 0) for k, v in alloc.items()})
        self._alloc = alloc
        self._waiting.append((row, self._refresh_start if report.refreshed else None, _Clock()))
        self._refresh_start = None
        self._write(wait=report.ending)

    def _write(self, wait: bool) -> None:
        """The lines whose events completed (``wait``: all of them, after a device sync; the next
        step, maybe after a pause, then has no previous one: ``step_s`` None)."""
        if wait and torch.cuda.is_available():
            torch.cuda.synchronize()
        lines = []
        while self._waiting and self._waiting[0][2].done():
            row, start, end = self._waiting.pop(0)
            row = {"step_s": None if self._last_end is None else end.seconds_since(self._last_end),
                   "refresh_s": end.seconds_since(start) if start is not None else 0.0, **row}
            lines.append(json.dumps(row))
            self._last_end = end
        if wait:
            self._last_end = None
        if lines:
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")
