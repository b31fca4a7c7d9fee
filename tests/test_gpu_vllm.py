"""GPU checks of the vLLM engine (marked ``gpu``; skipped without CUDA or vLLM).

Each test runs ``python -m vllm_odb.bench vllm-parity`` in a subprocess (a vLLM engine per process): vLLM's
greedy outputs must equal the reference loop's, token for token, alone and batched.
"""

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


def _parity(fmt: str, tmp_path, *args: str, env: dict | None = None) -> dict:
    """Run ``bench vllm-parity`` on the tiny ``fmt`` checkpoint (8 prompts, eager, block 16) with
    ``args`` (and ``env`` added to the environment); it must exit 0 (its own token, NFE, canvas and
    draft checks). Returns its summary."""
    pytest.importorskip("vllm")
    out = tmp_path / "parity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_odb.bench", "vllm-parity", "--model", str(ROOT / "checkpoints" / f"tiny-{fmt}"),
         "--mode", "eager", "--n", "8", "--block-length", "16", *args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["summary"]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_vllm_matches_reference_eager(fmt, tmp_path):
    summary = _parity(fmt, tmp_path, "--gen-length", "64")
    assert summary["alone_match"] == summary["batched_match"] == 8


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("overlap", ["1", "0", "always"])
def test_vllm_decode_steps_match_with_and_without_overlap(fmt, overlap, tmp_path):
    """odb-alp at threshold 1.0 (blocks take several decode steps): with overlap (the default: a
    step's outcome read at the next step, but for a step expected to complete its blocks), with every
    step deferred (VLLM_ODB_OVERLAP=always: a completed block out one step later, its request's
    forward in between idle) and without (0), tokens alone and batched, NFE and canvas equal the
    reference loop's."""
    summary = _parity(fmt, tmp_path, "--gen-length", "128", "--threshold", "1.0", "--method", "odb-alp",
                      env={"VLLM_ODB_OVERLAP": overlap})
    assert summary["alone_match"] == summary["batched_match"] == 8
    assert summary["nfe"]["vllm"] == summary["nfe"]["reference"] > 8
    if overlap != "1":  # (the default's idle forwards depend on how its blocks end)
        assert (summary["nfe"]["vllm_idle_forwards"] > 0) == (overlap == "always")


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("method,extra", [("odb-alp", ["--threshold", "1.0", "--mode", "graphs"]),
                                          ("odb", ["--threshold", "1.0", "--select", "speculative", "--ridge-rows", "64"]),
                                          ("fast-dllm", ["--suffix-window", "16", "--threshold-alpha", "0.3"])])
def test_vllm_paged_refresh_matches_reference(fmt, method, extra, tmp_path):
    """VLLM_ODB_REFRESH=paged: the cache refresh on vLLM's compiled forward with the attention
    backend over the paged cache (engine/model_state.py ``PagedRefresh``), with CUDA graphs and ALP's
    cuts, with jump-share's draft rows in the steps between, and with Streaming's pruned canvas (its
    final token): tokens and NFE equal the reference loop's, every prompt alone (and batched,
    without jump-share)."""
    summary = _parity(fmt, tmp_path, "--gen-length", "128", "--method", method, *extra,
                      env={"VLLM_ODB_REFRESH": "paged"})
    assert summary["alone_match"] == 8
    if method != "odb":
        assert summary["batched_match"] == 8
    assert summary["nfe"]["vllm"] == summary["nfe"]["reference"]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_vllm_odb_matches_reference_odb(fmt, tmp_path):
    """ALP, early stop and jump-share (threshold 1.0, so blocks take several steps and drafts are
    verified), selected with speculative_config={"method": "odb"}: tokens, NFE, predicted canvas
    and accepted drafts equal the reference loop's, every prompt alone."""
    summary = _parity(fmt, tmp_path, "--gen-length", "128", "--threshold", "1.0", "--method", "odb",
                      "--select", "speculative", "--ridge-rows", "64")
    assert summary["alone_match"] == 8
    assert summary["drafts_accepted"]["vllm"] == summary["drafts_accepted"]["reference"] > 0
    assert summary["nfe"]["vllm"] == summary["nfe"]["reference"]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("method,extra", [("dynamic-apd", []), ("odb-alp", ["--threshold-alpha", "0.3"]),
                                          ("odb", ["--threshold-alpha", "0.3", "--select", "speculative",
                                                   "--ridge-rows", "64"])])
def test_vllm_dynamic_thresholds_match_reference(fmt, method, extra, tmp_path):
    """Dynamic-dLLM's APD and Streaming-dLLM's dynamic threshold (with ALP, and with jump-share's
    per-branch thresholds) on the engine: tokens, NFE and canvas equal the reference loop's."""
    summary = _parity(fmt, tmp_path, "--gen-length", "128", "--method", method, *extra)
    assert summary["alone_match"] == 8
    assert summary["nfe"]["vllm"] == summary["nfe"]["reference"]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("method,extra", [("fast-dllm", ["--suffix-window", "16", "--threshold-alpha", "0.3"]),
                                          ("odb-streaming", ["--suffix-window", "16", "--threshold", "1.0",
                                                             "--ridge-rows", "64"])])
def test_vllm_suffix_pruning_matches_reference(fmt, method, extra, tmp_path):
    """Streaming-dLLM's suffix pruning on the engine's dual cache (with the dynamic threshold; and
    with jump-share and early exit, ``odb-streaming``): tokens, NFE and accepted drafts equal the
    reference loop's, every prompt alone."""
    summary = _parity(fmt, tmp_path, "--gen-length", "128", "--method", method, *extra)
    assert summary["alone_match"] == 8 and summary["suffix_window"] == 16
    assert summary["nfe"]["vllm"] == summary["nfe"]["reference"]


def test_vllm_serve_speculative_odb_with_defaults_serves_a_request(tmp_path):
    """``vllm serve checkpoints/tiny-llada --speculative odb`` and nothing else: the engine starts
    (its kernel warm-up used to feed ids past the 128-token vocabulary: patches/warmup_ids.py) and
    answers a chat completion."""
    import urllib.request

    pytest.importorskip("vllm")
    from vllm_odb.bench.serving import Server

    model = str(ROOT / "checkpoints" / "tiny-llada")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--speculative", "odb",
           "--host", "127.0.0.1", "--port", "8784"]
    with Server(cmd, log_path=str(tmp_path / "serve.log"), start_timeout=300) as server:
        body = json.dumps({"model": model, "max_tokens": 64, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is 2 + 3?"}]}).encode()
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
    assert answer["choices"][0]["message"]["content"].strip()
