"""GPU checks of serving under load and faults (marked ``gpu``; skipped without CUDA or vLLM):
small runs of ``python -m vllm_odb.bench server-fuzz``, ``server-soak`` and ``server-faults``,
each in a subprocess with its own loopback ``vllm serve`` of a tiny checkpoint (eager: they start
faster). Each must exit 0 (its own checks); the full runs and their figures are BENCHMARKS.md's
"Reliability" section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, command: str, *args: str, timeout: int = 600) -> dict:
    pytest.importorskip("vllm")
    out = tmp_path / f"{command}.json"
    proc = subprocess.run([sys.executable, "-m", "vllm_odb.bench", command, *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SERVER_LOG": str(tmp_path / "server.log")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_fuzz_small(tmp_path):
    """45 malformed requests (every category) at the default engine: 4xx only, no hang, a good
    request answered the same before and after."""
    report = _bench(tmp_path, "server-fuzz", "--model", str(ROOT / "checkpoints" / "tiny-llada"), "--n", "45",
                    "--eager")
    s = report["summary"]
    assert s["ok"] and s["failures"] == 0 and s["timeouts"] == 0
    assert set(s["by_category"]) == {c["category"] for c in report["cases"]} and len(s["by_category"]) == 9
    assert not any(k.startswith("5") for k in s["status_counts"])


@pytest.mark.parametrize("fmt,speculative", [("llada", False), ("dream", True)])
def test_soak_small(fmt, speculative, tmp_path):
    """120 requests from 40 streaming clients (a quarter abort): completed answers equal offline,
    KV free blocks back, nothing running."""
    args = ["--model", str(ROOT / "checkpoints" / f"tiny-{fmt}"), "--requests", "120", "--clients", "40",
            "--max-seconds", "540", "--eager"] + (["--speculative"] if speculative else [])
    s = _bench(tmp_path, "server-soak", *args)["summary"]
    assert s["ok"] and s["failed"] == 0 and s["unsent"] == 0
    assert s["completed"] > 0 and s["aborted"] > 0 and s["kv_cache"]["returned"]


def test_faults(tmp_path):
    """Injected NaN logits and raises end their requests with an error while the others and the
    server go on (jump-share engine); an engine crash fails /health instead of hanging clients."""
    s = _bench(tmp_path, "server-faults", "--model", str(ROOT / "checkpoints" / "tiny-llada"), "--speculative",
               "--eager", "--phases", "requests,crash")["summary"]
    assert s["ok"], s["problems"]
