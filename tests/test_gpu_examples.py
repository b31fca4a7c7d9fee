"""The GPU examples (marked ``gpu``; skipped without CUDA): examples/offline_batch.py and
examples/serve_and_stream.py run as a user runs them, in subprocesses with a timeout, on the
shipped tiny checkpoints; their answers must equal the reference loop's for the same knobs (the
engine is token-identical to it in float32; test_gpu_vllm.py). Only loopback traffic (the
example's own server on 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(script: str, *args: str, timeout: int = 600) -> tuple[dict, str]:
    """Run an example with ``--json``; it must exit 0. Returns its JSON line and its stdout."""
    pytest.importorskip("vllm")
    from vllm_odb.bench.serving import memory_flags

    memory = memory_flags(0.5)  # the examples' default, or a fixed KV cache ($VLLM_ODB_BENCH_KV_GIB: beside others)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args, "--json", *memory], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the JSON line; vLLM's engine may log its shutdown to stdout after it
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    assert line is not None, "no JSON line in the example's output:\n" + proc.stdout[-3000:]
    return json.loads(line), proc.stdout


def _reference(model: str, requests: list[tuple[str, dict | None]], max_tokens: int = 64) -> list[str]:
    """The reference loop's answer to each (prompt, extra_args) on the examples' engine
    (``--speculative odb``, block 32, ridge_rows 64), resolved as the engine resolves a request."""
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies.config import DecodeConfig
    from vllm_odb.reference.generate import generate, response_ids
    from vllm_odb.reference.loader import load_checkpoint

    ck = load_checkpoint(model, device="cpu")
    engine = DecodeConfig.for_method("odb", block_length=32, ridge_rows=64)
    out = []
    for prompt, knobs in requests:
        g = generate(ck.model, [ck.encode_chat(prompt)], request_config(engine, knobs, 0.0, max_tokens), ck.special)
        out.append(ck.tokenizer.decode(response_ids(g.tokens[0], ck.special), skip_special_tokens=True))
    return out


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_offline_batch_example(fmt):
    """One ``LLM.generate`` batch, six requests with six knob settings: each answer equals the
    reference loop's under the same knobs (and the suite's verifier takes it); tokens/s printed."""
    model = str(ROOT / "checkpoints" / f"tiny-{fmt}")
    res, out = _run("offline_batch.py", "--model", model)
    plans = _module("offline_batch").PLANS
    reqs = res["requests"]
    assert [r["extra_args"] for r in reqs] == [k for _, k in plans]
    expected = _reference(model, [(r["prompt"], r["extra_args"]) for r in reqs])
    assert [r["answer"] for r in reqs] == expected, out
    assert all(r["right"] for r in reqs), out  # the shipped checkpoints answer these six (reference: all right)
    assert all(r["tokens"] > 0 for r in reqs)
    assert res["tokens_per_s"] > 0 and "tokens/s" in out


def test_serve_and_stream_example():
    """``vllm serve --speculative odb`` and the openai client: a chat completion with
    ``vllm_xargs`` threshold 0.95 equals the reference's answer; the same request streamed gives
    the same text in block-sized chunks with usage; a streamed ``method: fast-dllm`` request
    answers; a misspelt knob is HTTP 400 naming it."""
    model = str(ROOT / "checkpoints" / "tiny-llada")
    mod = _module("serve_and_stream")
    res, out = _run("serve_and_stream.py", "--model", model, "--port", "8781")
    expected = _reference(model, [(mod.QUESTIONS[0], {"threshold": 0.95}), (mod.QUESTIONS[1], {"method": "fast-dllm"})])
    assert res["chat"]["text"] == expected[0], out
    assert res["stream_equals_chat"] and res["stream"]["text"] == expected[0]
    assert res["stream_fast_dllm"]["text"] == expected[1], out
    usage = res["stream"]["usage"]
    assert usage and usage["completion_tokens"] == res["chat"]["usage"]["completion_tokens"] > 0
    assert 1 <= res["stream"]["chunks"] <= -(-usage["completion_tokens"] // 32) + 1  # one chunk per block
    assert res["bad_knob"]["status"] == 400 and "thresh" in res["bad_knob"]["message"]
