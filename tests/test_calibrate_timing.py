"""``bench calibrate-fastdllm``'s interleaved timing (vllm_odb/bench/calibrate.py; the calibration's
figures come from it); the rest of the command needs Fast-dLLM's code, staged only for GPU runs."""

from __future__ import annotations

import torch

from vllm_odb.bench import calibrate


def _script():
    return calibrate


def test_calls_are_timed_round_by_round_in_order():
    cal = _script()
    log = []
    calls = {name: {kind: (lambda n=name, k=kind: log.append((n, k))) for kind in ("refresh", "decode")}
             for name in ("research", "fastdllm")}
    res = cal.time_interleaved(calls, torch.device("cpu"), warmup=2, iters=3)
    warm, timed = log[:8], log[8:]
    assert warm == [("research", "refresh")] * 2 + [("research", "decode")] * 2 + \
        [("fastdllm", "refresh")] * 2 + [("fastdllm", "decode")] * 2
    one_round = [("research", "refresh"), ("research", "decode"), ("fastdllm", "refresh"), ("fastdllm", "decode")]
    assert timed == one_round * 3  # each round times every call once, never one model's calls in a row
    for name in calls:
        for kind in ("refresh", "decode"):
            r = res[name][kind]
            assert len(r["samples_ms"]) == 3 and r["min_ms"] <= r["median_ms"] and r["median_ms"] >= 0
