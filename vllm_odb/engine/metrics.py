"""dLLM metrics on vLLM's Prometheus endpoint: NFE, tokens per forward, refresh tokens, predicted
canvas length, accepted drafts.

The numbers live in the worker (the sampler counts them per request); ``/metrics`` is served by
the API server, another process, and vLLM has no channel for model-specific stats between the
two. So the worker (tensor-parallel rank 0) writes its cumulative counters to a small JSON file in
``$VLLM_ODB_METRICS_DIR`` (at most once a second, from the sampler's step), and the API server's
Prometheus registry holds a collector that sums those files at scrape time. The plugin creates the
directory in the first process that loads it (the server), and the engine processes it starts
inherit the variable. Offline, ``snapshot()`` reads the same counters.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ENV = "VLLM_ODB_METRICS_DIR"
PREFIX = "vllm_odb:"
# counter name -> help. Summed over finished and aborted requests.
COUNTERS = {
    "requests": "Requests that ended (finished or aborted)",
    "forwards": "Forwards that decided tokens, summed over requests (NFE)",
    "tokens": "Canvas tokens decoded (whole blocks, before the response is cut at its end)",
    "refreshes": "Cache-refresh forwards (one per block)",
    "refresh_tokens": "Tokens processed by cache-refresh forwards",
    "refresh_graph_tokens": "Of those, tokens of refresh forwards that replayed CUDA graphs",
    "idle_forwards": "Canvas forwards that decided nothing (a block completed by its refresh, or the step after "
                     "a block completed, whose outcome the sampler reads one step late: overlap)",
    "drafts_accepted": "Drafted tokens adopted by jump-share verification",
    "canvas_requested": "Canvas tokens requested (gen_length, cut to max_model_len)",
    "canvas_predicted": "Canvas tokens left after adaptive length prediction",
}
_WRITE_EVERY_S = 1.0
_own_dir: str | None = None


def metrics_dir(create: bool = False) -> Path | None:
    """The shared directory; with ``create`` the first process makes one (removed at its exit)."""
    global _own_dir
    path = os.environ.get(ENV)
    if path is None and create:
        _own_dir = tempfile.mkdtemp(prefix="vllm-odb-metrics-")
        atexit.register(shutil.rmtree, _own_dir, True)
        os.environ[ENV] = path = _own_dir
    return Path(path) if path else None


class RequestCounters:
    """Worker side: cumulative counters of this engine, written for the server's collector."""

    def __init__(self, enabled: bool = True):
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.enabled = enabled
        self._dir = metrics_dir() if enabled else None
        self._path = None if self._dir is None else self._dir / f"engine-{os.getpid()}.json"
        self._last_write = 0.0
        self._dirty = False

    def add(self, stats: dict) -> None:
        """One request ended: add its per-request stats (engine/requests.py ``ODBRequest.stats``)."""
        self.totals["requests"] += 1
        for key in COUNTERS:
            if key != "requests":
                self.totals[key] += int(stats.get(key, 0))
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        """Write the totals if they changed and (unless ``force``) a second has passed."""
        if self._path is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_write < _WRITE_EVERY_S:
            return
        self._last_write = now
        self._dirty = False
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.totals))
            tmp.replace(self._path)  # atomic: the collector never reads half a file
        except OSError:
            pass  # metrics must never take the engine down


def snapshot(path: Path | None = None) -> dict[str, int]:
    """Counters summed over every engine that wrote to the metrics directory."""
    folder = path or metrics_dir()
    total = dict.fromkeys(COUNTERS, 0)
    if folder is None or not folder.is_dir():
        return total
    for f in folder.glob("engine-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for key in COUNTERS:
            total[key] += int(data.get(key, 0))
    return total


class ODBCollector:
    """Server side: a Prometheus collector over ``snapshot()``."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = snapshot()
        for key, doc in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}{key}", doc, value=totals[key])
        forwards = totals["forwards"] + totals["idle_forwards"]
        yield GaugeMetricFamily(f"{PREFIX}tokens_per_forward", "Decoded tokens per forward, all requests so far",
                                value=totals["tokens"] / forwards if forwards else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}predicted_length_ratio",
                                "Canvas left after adaptive length prediction / canvas requested",
                                value=totals["canvas_predicted"] / totals["canvas_requested"]
                                if totals["canvas_requested"] else 1.0)


_collector: ODBCollector | None = None


def register_collector() -> None:
    """Add the collector to prometheus_client's default registry (what vLLM's /metrics serves)."""
    global _collector
    if _collector is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _collector = ODBCollector()
    REGISTRY.register(_collector)
