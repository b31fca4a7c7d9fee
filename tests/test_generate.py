"""The reference generate loop on the shipped tiny checkpoints (fp32, CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vllm_odb.bench.research import set_attention_impl
from vllm_odb.policies import DecodeConfig, decide
from vllm_odb.policies.step import branch_step, plan_branches
from vllm_odb.reference.generate import branch_forward, generate, response_ids
from vllm_odb.reference.loader import load_checkpoint

from shipped import ANSWER_GEN, STOP_CASE, WORKED, correct, make_suite, roomy_ridge

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("llada", "dream")


@pytest.fixture(scope="module", params=FORMATS)
def ckpt(request):
    return load_checkpoint(str(ROOT / "checkpoints" / f"tiny-{request.param}"))


def _answers(ckpt, out):
    return [ckpt.tokenizer.decode(response_ids(c, ckpt.special), skip_special_tokens=True) for c in out.tokens]


def _accuracy(ckpt, suite, cfg):
    out = generate(ckpt.model, [ckpt.encode_chat(e.prompt) for e in suite], cfg, ckpt.special)
    return sum(correct(a, e) for a, e in zip(_answers(ckpt, out), suite)) / len(suite), out


@pytest.mark.slow  # vanilla at one token per forward: minutes on a CPU
def test_suite_subset_accuracy(ckpt):
    """Held-out seed, a canvas the answers end in: vanilla >= 90 %, Fast-dLLM threshold 0.9 >= 85 %
    (basic suite, 40 prompts). The worked suite's answers are long, so 10 prompts and a smoke bar
    (vanilla >= 80 %, Fast-dLLM within 10 points): #19's accuracy table (BENCHMARKS.md) is the
    measurement, on 100 prompts."""
    suite = make_suite(7, 10 if WORKED else 40)
    acc_vanilla, out = _accuracy(ckpt, suite, DecodeConfig.for_method("vanilla", gen_length=ANSWER_GEN))
    assert acc_vanilla >= (0.8 if WORKED else 0.9)
    assert out.nfe == [ANSWER_GEN] * len(suite)  # one token per step
    acc_fast, out = _accuracy(ckpt, suite, DecodeConfig.for_method("fast-dllm", gen_length=ANSWER_GEN))
    assert acc_fast >= (acc_vanilla - 0.1 if WORKED else 0.85)
    assert max(out.nfe) < ANSWER_GEN


def test_eos_fills_the_canvas_confidently(ckpt):
    """After the answer the model predicts EOS over the rest of the canvas with high confidence."""
    suite = make_suite(11, 4 if WORKED else 10)
    gen = ANSWER_GEN if WORKED else 128
    out = generate(ckpt.model, [ckpt.encode_chat(e.prompt) for e in suite],
                   DecodeConfig.for_method("fast-dllm", gen_length=gen), ckpt.special)
    m, shift = ckpt.special.mask_id, ckpt.model.spec.logits_shift
    for ex, canvas in zip(suite, out.tokens):
        prompt = ckpt.encode_chat(ex.prompt)
        resp = response_ids(canvas, ckpt.special)
        keep = len(resp) + 1  # answer and its end-of-turn marker
        ids = torch.tensor([prompt + canvas[:keep] + [m] * (gen - keep)])
        logits = ckpt.model(ids, torch.arange(ids.shape[1])[None])
        pred = logits[0, len(prompt) + keep - shift: ids.shape[1] - shift].softmax(-1)
        conf, tok = pred.max(-1)
        assert (tok == ckpt.special.eos_id).all()
        assert conf.min() > 0.9


@pytest.mark.parametrize("method,cache", [pytest.param("vanilla", "none", marks=pytest.mark.slow),  # 64 forwards x 6
                                          ("fast-dllm", "none"), ("fast-dllm", "prefix"), ("fast-dllm", "dual"),
                                          ("odb", "dual")])
def test_batch_invariance(ckpt, method, cache):
    """Each request decodes the same alone and inside a batch of prompts of other lengths. (For
    jump-share, whose draft budget the batch shares, a budget that holds every request's largest
    plan: a smaller share drafts less, and drafts change what is committed at threshold 0.9.)"""
    suite = make_suite(3, 5)
    prompts = [ckpt.encode_chat(e.prompt) for e in suite]
    assert len({len(p) for p in prompts}) > 1
    cfg = DecodeConfig.for_method(method, gen_length=64, cache=cache)
    if cfg.jump:
        cfg = cfg.replace(ridge_rows=roomy_ridge(cfg.block_length, cfg.max_draft_positions, len(prompts)))
    together = generate(ckpt.model, prompts, cfg, ckpt.special)
    for i, p in enumerate(prompts):
        alone = generate(ckpt.model, [p], cfg, ckpt.special)
        assert alone.tokens[0] == together.tokens[i]
        assert alone.nfe[0] == together.nfe[i]


def test_cache_modes_agree_when_each_block_is_decided_at_its_refresh(ckpt):
    """With a threshold so low that every block is committed by its first (full) forward, no
    cache, prefix cache and dual cache must produce identical tokens."""
    prompts = [ckpt.encode_chat(e.prompt) for e in make_suite(5, 4)]
    outs = [generate(ckpt.model, prompts, DecodeConfig(gen_length=64, threshold=1e-6, cache=c), ckpt.special)
            for c in ("none", "prefix", "dual")]
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens
    assert outs[0].nfe == [2] * len(prompts)


@pytest.mark.slow  # an accuracy check over three decodes of a suite (~15 s a format)
def test_cached_steps_differ_from_uncached_only_by_cache_staleness(ckpt):
    """Multi-step blocks (threshold 1.0): the three cache modes still answer correctly."""
    suite = make_suite(9, 6)
    for cache in ("none", "prefix", "dual"):
        acc, out = _accuracy(ckpt, suite, DecodeConfig(gen_length=64, threshold=1.0, cache=cache))
        assert acc >= 0.8, cache
        assert max(out.nfe) > 2


def test_odb_shortens_and_stops_early_without_losing_answers(ckpt):
    suite = make_suite(13, 4 if WORKED else 12)
    gen = ANSWER_GEN if WORKED else 128
    acc_fast, fast = _accuracy(ckpt, suite, DecodeConfig.for_method("fast-dllm", gen_length=gen))
    acc_odb, odb = _accuracy(ckpt, suite, DecodeConfig.for_method("odb", gen_length=gen))
    assert acc_odb >= acc_fast - 1 / len(suite)
    # Basic answers take a forward a block, so early stop's saved EOS blocks halve the forwards; worked
    # answers take most of them (~2 tokens a forward), and drafts and early stop save about 40%.
    assert sum(odb.nfe) <= (0.7 if WORKED else 0.5) * sum(fast.nfe)
    assert sum(odb.stats["refresh_tokens"]) <= 0.6 * sum(fast.stats["refresh_tokens"])
    for canvas, length, resp_len in zip(odb.tokens, odb.stats["canvas_length"], map(len, (
            response_ids(c, ckpt.special) for c in odb.tokens))):
        assert length % 32 == 0 and resp_len < length <= gen
        assert len(canvas) == gen and ckpt.special.mask_id not in canvas


def test_jump_share_step_equals_two_plain_steps(ckpt):
    """Exactness: when the draft set equals what the base step commits, one jump-share forward
    reaches the state of two plain Fast-dLLM (dual cache) steps, token for token."""
    model, sp = ckpt.model, ckpt.special
    shift = model.spec.logits_shift
    cfg = DecodeConfig(gen_length=32, threshold=1.0, cache="dual", jump=True, ridge_rows=4096)
    for ex in make_suite(21, 6):
        prompt = ckpt.encode_chat(ex.prompt)
        plen = len(prompt)
        x = torch.tensor([prompt + [sp.mask_id] * 32])
        pos = torch.arange(x.shape[1])[None]
        keys = torch.ones_like(x, dtype=torch.bool)
        s, e = plen, plen + 32
        q0 = s - shift
        logits, cache = model(x, pos, keys, return_kv=True)
        masked = x[:, s:e] == sp.mask_id
        x0, conf, commit = decide(logits[:, q0:e - shift], masked, cfg, sp.mask_id)  # the refresh step
        x[:, s:e] = torch.where(commit, x0, x[:, s:e])

        def plain(xs):
            m = xs[:, s:e] == sp.mask_id
            lg = model(xs[:, q0:e], pos[:, q0:e], keys, past=cache, splice=(q0, e))[:, :32]
            return decide(lg, m, cfg, sp.mask_id)

        x0_1, conf_1, c1 = plain(x)
        if int(c1.sum()) >= int((x[:, s:e] == sp.mask_id).sum()):
            continue  # the first plain step finishes the block: nothing to draft
        step1 = torch.where(c1, x0_1, x[:, s:e])
        x2 = x.clone()
        x2[:, s:e] = step1
        x0_2, _, c2 = plain(x2)
        two_steps = torch.where(c2, x0_2, step1)

        # Drafts = exactly what the plain step commits: make those positions the most confident.
        # One jump-share step as the reference loop takes it: plan, forward, decide and accept.
        k = int(c1.sum())
        jcfg = cfg.replace(max_draft_positions=k)
        masked = x[:, s:e] == sp.mask_id
        branches = plan_branches(x[:, s:e], x[:, q0:s], x0_1, torch.where(c1, 2.0, 0.0), masked, jcfg, 1)
        logits = branch_forward(model, x, pos, keys, cache, s, e, branches)
        new = branch_step(logits, branches, masked.any(1), jcfg, sp.mask_id)
        assert int(new.accepted[0]) == k
        assert new.block.tolist() == two_steps.tolist()
        break
    else:
        pytest.skip("no prompt needed two plain steps in its first block")


def test_jump_share_accepts_drafts_and_saves_forwards(ckpt):
    """At threshold 1.0 a plain step commits one position, so an accepted full-block draft reaches
    the very state plain steps would: the same response in fewer forwards. (A budget that holds
    full-block drafts: the shared-KV layout a smaller one takes reads the base branch's keys for
    the drafted positions, an approximation that changes tokens on the worked checkpoints.)"""
    suite = make_suite(17, 4)
    prompts = [ckpt.encode_chat(e.prompt) for e in suite]
    base = DecodeConfig.for_method("fast-dllm", gen_length=64, threshold=1.0).replace(early_stop=True)
    jump = base.replace(jump=True, ridge_rows=1024)
    nfe_plain, nfe_jump, accepted = 0, 0, 0
    for p in prompts:  # batch 1: the whole draft budget is one request's
        a = generate(ckpt.model, [p], base, ckpt.special)
        b = generate(ckpt.model, [p], jump, ckpt.special)
        assert response_ids(a.tokens[0], ckpt.special) == response_ids(b.tokens[0], ckpt.special)
        nfe_plain += a.nfe[0]
        nfe_jump += b.nfe[0]
        accepted += b.stats["drafted_accepted"][0]
        assert max(b.stats["query_rows"][0], 0) <= jump.ridge_rows * max(1, b.stats["cached_forwards"][0])
    assert accepted > 0
    assert nfe_jump < nfe_plain


def test_jump_share_without_budget_room_is_plain_decoding(ckpt):
    """A budget that holds only the block leaves no room for drafts (as a large batch does:
    the budget is shared by the live requests): jump-share then decodes exactly like plain."""
    prompts = [ckpt.encode_chat(e.prompt) for e in make_suite(19, 6)]
    cfg = DecodeConfig.for_method("odb-jump", gen_length=64, threshold=1.0, ridge_rows=32)
    plain = generate(ckpt.model, prompts, cfg.replace(jump=False), ckpt.special)
    out = generate(ckpt.model, prompts, cfg, ckpt.special)
    assert sum(out.stats["drafted_accepted"]) == 0
    assert out.tokens == plain.tokens
    assert out.nfe == plain.nfe


def test_jump_share_off_at_temperature(ckpt, caplog):
    cfg = DecodeConfig.for_method("odb", gen_length=64, temperature=0.5)
    with caplog.at_level(logging.WARNING):
        out = generate(ckpt.model, [ckpt.encode_chat("Reverse the word apple.")], cfg, ckpt.special,
                       generator=torch.Generator().manual_seed(0))
    assert "speculation is off" in caplog.text
    assert out.stats["drafted_accepted"] == [0]


def test_stop_strings_end_the_response(ckpt):
    """A stop string is an end marker: ALP may cut at it and early termination stops there: the
    response is the block that completes it (the text after a stop string is vLLM's to drop)."""
    prompt_text, stop_text, start = STOP_CASE
    prompt = ckpt.encode_chat(prompt_text)
    stop = ckpt.tokenizer(stop_text, add_special_tokens=False)["input_ids"]
    cfg = DecodeConfig.for_method("odb", gen_length=ANSWER_GEN + 32)
    out = generate(ckpt.model, [prompt], cfg, ckpt.special, stop=[stop])
    text = ckpt.tokenizer.decode(response_ids(out.tokens[0], ckpt.special), skip_special_tokens=True)
    assert text.startswith(start) and stop_text.strip() in text, text
    assert out.stats["canvas_length"] == [32]


@pytest.mark.parametrize("method,cache,threshold", [pytest.param("vanilla", "none", None, marks=pytest.mark.slow),
                                                    ("fast-dllm", "prefix", 1.0), ("fast-dllm", "dual", 1.0),
                                                    ("odb-alp", "dual", 1.0)])
def test_research_attention_decodes_the_same(ckpt, method, cache, threshold):
    """The research code's cache layout (keys before RoPE, in-place dual-cache writes) is only a
    cost: on a padded batch with multi-step blocks it decodes the same tokens with the same NFE."""
    from vllm_odb.reference.model import DiffusionLM

    prompts = [ckpt.encode_chat(e.prompt) for e in make_suite(21, 4)]
    knobs = {"gen_length": 64, "cache": cache, **({"threshold": threshold} if threshold else {})}
    cfg = DecodeConfig.for_method(method, **knobs)
    research = DiffusionLM(ckpt.model.spec)
    research.load_state_dict(ckpt.model.state_dict())
    set_attention_impl(research, "research")
    plain_out = generate(ckpt.model, prompts, cfg, ckpt.special)
    research_out = generate(research.eval(), prompts, cfg, ckpt.special)
    assert research_out.tokens == plain_out.tokens
    assert research_out.nfe == plain_out.nfe
    assert research_out.stats["canvas_length"] == plain_out.stats["canvas_length"]
    if cache != "none":
        assert max(plain_out.stats["cached_forwards"]) > 0  # cached steps ran


@pytest.mark.parametrize("method,knob", [("odb", "jump-share"), ("streaming", "suffix_window"),
                                         ("dynamic", "dcu")])
def test_research_attention_refuses_what_the_research_code_lacks(ckpt, method, knob):
    from vllm_odb.reference.model import DiffusionLM

    research = DiffusionLM(ckpt.model.spec)
    research.load_state_dict(ckpt.model.state_dict())
    set_attention_impl(research, "research")
    with pytest.raises(ValueError, match=knob):
        generate(research, [ckpt.encode_chat("hi")], DecodeConfig.for_method(method, gen_length=64), ckpt.special)


def test_bad_inputs(ckpt):
    cfg = DecodeConfig.for_method("fast-dllm", gen_length=64)
    with pytest.raises(ValueError, match="empty"):
        generate(ckpt.model, [[]], cfg, ckpt.special)
    with pytest.raises(ValueError, match="max_position"):
        generate(ckpt.model, [[1] * ckpt.model.spec.max_position], cfg, ckpt.special)
    with pytest.raises(ValueError, match="block_length"):
        DecodeConfig.for_method("fast-dllm", gen_length=100, block_length=32)
