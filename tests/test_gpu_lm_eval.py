"""lm-eval against vLLM (marked ``gpu``; skipped without CUDA, vLLM or lm-eval).

A ``vllm serve <tiny-llada> --speculative odb`` on 127.0.0.1 (loopback only); lm-eval's
``local-chat-completions`` and ``local-completions`` run the ``odb_suite`` task (vllm_odb/eval)
against it on 40 prompts, and lm-eval's in-process ``vllm`` model runs it with our plugin; each
score must equal ``python -m vllm_odb.bench quality``'s (the reference engine) on the same
prompts with the same decoding knobs, and so must the answers that quality reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "checkpoints" / "tiny-llada")
PORT = 8782
LIMIT, SEED = 40, 0
# The server's engine: bench quality's defaults (block 32; gen 64 = the task's max_gen_toks) and a
# small draft budget (see bench/loopback.py).
ENGINE = {"block_length": 32, "ridge_rows": 64}


def _quality(method: str) -> dict:
    from vllm_odb.policies.config import METHODS

    ridge = ["--ridge-rows", "64"] if METHODS[method].get("jump") else []  # a knob the method ignores is refused
    proc = subprocess.run([sys.executable, "-m", "vllm_odb.bench", "quality", "--model", MODEL, "--method", method,
                           "--limit", str(LIMIT), "--seed", str(SEED), "--gen-length", "64", "--block-length", "32",
                           *ridge, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quality():
    return {m: _quality(m) for m in ("odb", "fast-dllm")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("lm_eval")
    from vllm_odb.bench.serving import Server, memory_flags

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL, "--speculative", "odb",
           "--dtype", "float32", "--max-model-len", "512", *memory_flags(), "--seed", "0",
           "--host", "127.0.0.1", "--port", str(PORT), "--additional-config", json.dumps({"odb": ENGINE})]
    with Server(cmd, log_path=str(log_path), start_timeout=420) as s:
        yield s.url + "/v1"


def _lm_eval(tmp_path, model: str, model_args: str, *extra: str) -> tuple[dict, list[dict]]:
    """``lm_eval`` (its own command line) on odb_suite, ``--limit 40``; returns the task's results
    and its logged samples in document order."""
    from vllm_odb.eval import include_path

    out = tmp_path / "lm_eval"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                           "--tasks", "odb_suite", "--include_path", include_path(), "--apply_chat_template",
                           "--limit", str(LIMIT), "--metadata", json.dumps({"suite_seed": SEED}),
                           "--output_path", str(out), "--log_samples", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["odb_suite"]
    samples = [json.loads(line) for line in next(out.rglob("samples_odb_suite_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def _same_score(results: dict, samples: list[dict], ours: dict) -> None:
    assert len(samples) == ours["limit"] == LIMIT
    got = [s["resps"][0][0] for s in samples[:len(ours["samples"])]]
    assert got == [s["output"] for s in ours["samples"]], (got, ours["samples"])
    assert results["accuracy,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert results["final_accuracy,none"] == pytest.approx(ours["final_accuracy"], abs=1e-12)


def test_local_chat_completions_scores_like_bench_quality(server, quality, tmp_path):
    results, samples = _lm_eval(tmp_path, "local-chat-completions",
                                f"model={MODEL},base_url={server}/chat/completions,max_retries=1")
    _same_score(results, samples, quality["odb"])


def test_local_completions_scores_like_bench_quality(server, quality, tmp_path):
    """Completions with the checkpoint's tokenizer applying the chat template on lm-eval's side;
    the prompt goes as token ids (no second BOS)."""
    results, samples = _lm_eval(tmp_path, "local-completions",
                                f"model={MODEL},base_url={server}/completions,tokenizer_backend=huggingface,"
                                "tokenized_requests=True,max_retries=1")
    _same_score(results, samples, quality["odb"])


def test_per_request_knobs_through_gen_kwargs(server, quality, tmp_path):
    """``--gen_kwargs '{"vllm_xargs": {"method": "fast-dllm"}}'`` reaches the engine per request:
    the score is fast-dllm's."""
    results, samples = _lm_eval(tmp_path, "local-chat-completions",
                                f"model={MODEL},base_url={server}/chat/completions,max_retries=1",
                                "--gen_kwargs", json.dumps({"vllm_xargs": {"method": "fast-dllm"}}))
    assert samples[0]["arguments"]["gen_args_0"]["arg_1"]["vllm_xargs"] == {"method": "fast-dllm"}
    _same_score(results, samples, quality["fast-dllm"])


def test_lm_eval_in_process_vllm_model_with_the_plugin(quality, tmp_path):
    """lm-eval's ``--model vllm`` builds ``LLM(**model_args)`` in its own process: vLLM loads our
    plugin there, ``speculative_config`` / ``additional_config`` pass through the JSON model
    arguments, and (vLLM having registered our config class) its ``AutoConfig`` call works. Its
    answers keep special tokens unless ``skip_special_tokens`` is set through ``--gen_kwargs``."""
    pytest.importorskip("vllm")
    pytest.importorskip("lm_eval")
    from vllm_odb.bench.serving import memory_kwargs

    args = {"pretrained": MODEL, "dtype": "float32", "max_model_len": 512, **memory_kwargs(), "seed": 0,
            "speculative_config": {"method": "odb"}, "additional_config": {"odb": ENGINE}}
    results, samples = _lm_eval(tmp_path, "vllm", json.dumps(args), "--gen_kwargs",
                                json.dumps({"skip_special_tokens": True}), "--batch_size", "auto")
    _same_score(results, samples, quality["odb"])
