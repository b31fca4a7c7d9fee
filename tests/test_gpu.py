"""GPU checks of the reference engine (marked ``gpu``; skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_odb.policies import DecodeConfig
from vllm_odb.reference.generate import generate, response_ids
from vllm_odb.reference.loader import load_checkpoint
from vllm_odb.tiny.suite import make_suite, score

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("method", ["fast-dllm", "odb"])
def test_cuda_fp32_matches_cpu(fmt, method):
    """The same decode on the GPU (fp32) and the CPU gives the same tokens."""
    path = str(ROOT / "checkpoints" / f"tiny-{fmt}")
    prompts_src = make_suite(23, 16)
    outs = []
    for device in ("cpu", "cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        ck = load_checkpoint(path, device=device)
        prompts = [ck.encode_chat(e.prompt) for e in prompts_src]
        outs.append(generate(ck.model, prompts, DecodeConfig.for_method(method, gen_length=128), ck.special))
    assert outs[0].tokens == outs[1].tokens
    assert outs[0].nfe == outs[1].nfe


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_cuda_bf16_quality(fmt):
    """bf16 (the official checkpoints' dtype) keeps the tiny models' accuracy."""
    ck = load_checkpoint(str(ROOT / "checkpoints" / f"tiny-{fmt}"), dtype=torch.bfloat16, device="cuda")
    suite = make_suite(29, 200)
    out = generate(ck.model, [ck.encode_chat(e.prompt) for e in suite],
                   DecodeConfig.for_method("odb", gen_length=128), ck.special)
    answers = [ck.tokenizer.decode(response_ids(c, ck.special), skip_special_tokens=True) for c in out.tokens]
    assert sum(score(a, e.answer) for a, e in zip(answers, suite)) / len(suite) >= 0.9


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_research_attention_decodes_as_plain(fmt, cache):
    """The benchmarks' calibrated reference (bench/research.py, attention_impl="research": keys
    cached before RoPE, in-place dual-cache writes at device-found indices) decodes as the plain
    layout on the GPU."""
    from vllm_odb.bench.research import set_attention_impl

    ck = load_checkpoint(str(ROOT / "checkpoints" / f"tiny-{fmt}"), device="cuda")
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(31, 16)]
    cfg = DecodeConfig.for_method("odb-alp", gen_length=128, cache=cache, threshold=1.0)
    plain = generate(ck.model, prompts, cfg, ck.special)
    set_attention_impl(ck.model, "research")
    try:
        research = generate(ck.model, prompts, cfg, ck.special)
    finally:
        set_attention_impl(ck.model, "plain")
    assert research.tokens == plain.tokens and research.nfe == plain.nfe
    assert max(plain.stats["cached_forwards"]) > 0
