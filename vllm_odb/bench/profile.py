"""The engine's step profiler (``VLLM_ODB_PROFILE=path``; benchmarks only).

The sampler (engine/sampler.py) takes it as its step observer when the variable is set in the
engine process (``vllm_odb.engine.step_observer``): it appends one JSON line per engine step to
``path``, with the wall time since the previous step ended (``step_s``), the time of the refresh
phase (``refresh_s``), the decode and refresh requests, the tokens the refreshes processed and the
keys the decode rows attended, and the runner's batch (``tokens``, ``reqs``). Each line syncs the
device first (on a GPU), so the times are of finished work. ``bench speed`` and ``bench vllm-full-size``
read it (decode-only and refresh-only steps against the GPU's ceilings).
"""

from __future__ import annotations

import json
import time

import torch


class StepProfiler:
    def __init__(self, path: str):
        self.path = path
        self._last_end: float | None = None
        self._refresh_start = 0.0

    def refresh_started(self) -> None:
        self._refresh_start = time.perf_counter()

    def step_ended(self, report) -> None:
        """``report``: the sampler's ``StepReport`` (the batch, the decoded and refreshed requests)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        batch = report.input_batch
        row = {"step_s": None if self._last_end is None else now - self._last_end,
               "refresh_s": now - self._refresh_start if report.refreshed else 0.0,
               "decode_reqs": len(report.decoded), "refresh_reqs": len(report.refreshed),
               "refresh_tokens": sum(q.keys for q in report.refreshed),
               "kv_tokens": sum(q.keys for q in report.decoded),
               "tokens": int(batch.num_tokens), "reqs": int(batch.num_reqs)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._last_end = now
