"""Numerical tests of the reference DiffusionLM (vllm_odb/reference/model.py) on CPU.

The model is checked against a naive forward pass written here from the architecture description
(models.md 2.3 / 4.3): explicit RMSNorm (fp32 normalise, cast, then scale), rotate-half RoPE at the
given positions, grouped-query attention by explicit einsum + softmax (no SDPA, no cache), SwiGLU
MLP, final norm and LM head. The weights are read from the model's state_dict by their internal
(Hugging Face Llama) names, so the test also pins the module tree to that layout.

Then the cache contract: a dual-cache step (splice) and a prefix-cache step (append) over
unchanged tokens reproduce the full forward exactly, and stacked draft branches under a
block-diagonal attention mask reproduce one dual-cache step per branch.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_odb.checkpoint import ModelSpec
from vllm_odb.reference.model import DiffusionLM, init_weights
from vllm_odb.tiny.formats import build_tokenizer, model_config

torch.set_num_threads(2)

REL_TOL = 1e-4

# (fmt, heads, kv_heads, extra config keys). Dream always has q/k/v biases; one LLaDA case turns
# on include_qkv_bias and one ties the LM head to the embedding so those paths are exercised too.
CASES = [
    ("llada", 4, 4, {}),
    ("llada", 4, 2, {}),
    ("llada", 8, 2, {"include_qkv_bias": True}),
    ("llada", 4, 1, {"weight_tying": True}),
    ("dream", 4, 4, {}),
    ("dream", 4, 2, {}),
    ("dream", 8, 2, {}),
    ("dream", 4, 1, {}),
]
CASE_IDS = [f"{f}-h{h}-kv{kv}" + "".join(f"-{k}" for k in extra) for f, h, kv, extra in CASES]
# The cache tests run on a subset that still covers MHA, GQA, MQA, biases and a tied head.
CACHE_CASES = [CASES[i] for i in (1, 2, 3, 4, 6)]
CACHE_IDS = [CASE_IDS[i] for i in (1, 2, 3, 4, 6)]

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(fmt: str):
    if fmt not in _TOKENIZERS:
        _TOKENIZERS[fmt] = build_tokenizer(fmt, "basic")
    return _TOKENIZERS[fmt]


def make_model(fmt: str, heads: int, kv_heads: int, extra: dict | None = None, seed: int = 0) -> DiffusionLM:
    cfg = model_config(fmt, _tokenizer(fmt), hidden=64, layers=2, heads=heads, kv_heads=kv_heads,
                       mlp=128, vocab_rows=128, max_len=512)
    cfg.update(extra or {})
    spec = ModelSpec.from_config(cfg)
    assert spec.num_heads == heads and spec.num_kv_heads == kv_heads and spec.head_dim == 64 // heads
    model = DiffusionLM(spec)
    init_weights(model, std=0.05, seed=seed)
    # init_weights sets norms to one and biases to zero; make them non-trivial so they matter.
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Naive forward
# ---------------------------------------------------------------------------------------------


def naive_forward(model: DiffusionLM, ids: torch.Tensor, positions: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, T, V] of ``ids`` [B, T] at ``positions`` [B, T]; ``allowed`` [B, T, T] bool
    (True = query may attend key) or None for full bidirectional attention."""
    spec = model.spec
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    eps = spec.rms_norm_eps
    n_h, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group = n_h // n_kv
    bsz, t = ids.shape

    def rmsnorm(x, w):
        y = x.to(torch.float32)
        y = y / torch.sqrt((y * y).mean(dim=-1, keepdim=True) + eps)
        return w * y.to(x.dtype)

    def linear(x, name, bias=False):
        y = x @ sd[name + ".weight"].T
        if bias:
            y = y + sd[name + ".bias"]
        return y

    # RoPE tables, rotate-half convention: frequency i pairs dims i and i + hd/2.
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = positions.to(torch.float64)[:, :, None] * inv_freq[None, None, :]  # [B, T, hd/2]
    cos = torch.cos(ang).to(torch.float32)
    sin = torch.sin(ang).to(torch.float32)

    def rope(x):  # x [B, T, heads, hd]
        half = hd // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    h = sd["model.embed_tokens.weight"][ids]  # [B, T, D]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = rmsnorm(h, sd[p + "input_layernorm.weight"])
        q = linear(a, p + "self_attn.q_proj", spec.qkv_bias).view(bsz, t, n_h, hd)
        k = linear(a, p + "self_attn.k_proj", spec.qkv_bias).view(bsz, t, n_kv, hd)
        v = linear(a, p + "self_attn.v_proj", spec.qkv_bias).view(bsz, t, n_kv, hd)
        q, k = rope(q), rope(k)
        heads_out = []
        for j in range(n_h):
            kv_j = j // group
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, j], k[:, :, kv_j]) / math.sqrt(hd)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            heads_out.append(torch.einsum("bqk,bkd->bqd", probs, v[:, :, kv_j]))
        att = torch.cat(heads_out, dim=-1)  # [B, T, n_h * hd], head-major like merge_heads
        h = h + linear(att, p + "self_attn.o_proj")
        f = rmsnorm(h, sd[p + "post_attention_layernorm.weight"])
        gate = linear(f, p + "mlp.gate_proj")
        up = linear(f, p + "mlp.up_proj")
        h = h + linear(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    h = rmsnorm(h, sd["model.norm.weight"])
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return h @ head.T


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def random_ids(model: DiffusionLM, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.spec.vocab_size, shape, generator=gen)


def arange_positions(b: int, t: int) -> torch.Tensor:
    return torch.arange(t)[None].expand(b, t).contiguous()


# ---------------------------------------------------------------------------------------------
# Forward vs naive
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CASES, ids=CASE_IDS)
def test_forward_matches_naive_unpadded(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=1)
    ids = random_ids(model, (2, 13), seed=2)
    pos = arange_positions(2, 13)
    with torch.no_grad():
        got = model(ids, pos)
        ref = naive_forward(model, ids, pos)
    assert got.shape == (2, 13, model.spec.vocab_size)
    assert rel_err(got, ref) < REL_TOL
    # Not trivially equal to something position- or context-free: logits depend on the context.
    assert (got[0] - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CASES, ids=CASE_IDS)
def test_forward_matches_naive_offset_positions(fmt, heads, kv_heads, extra):
    """Explicit, non-arange positions (large offsets) go through RoPE as given."""
    model = make_model(fmt, heads, kv_heads, extra, seed=3)
    ids = random_ids(model, (2, 9), seed=4)
    pos = torch.stack([torch.arange(9) + 100, torch.arange(9) * 3 + 7])
    with torch.no_grad():
        got = model(ids, pos)
        ref = naive_forward(model, ids, pos)
    assert rel_err(got, ref) < REL_TOL
    # RoPE attention is relative: row 0 (arange + 100) equals arange, while row 1 (stride 3) has a
    # different relative layout and must differ, so the given positions are really used.
    with torch.no_grad():
        other = model(ids, arange_positions(2, 9))
    assert rel_err(other[0], got[0]) < REL_TOL
    assert rel_err(other[1], got[1]) > 1e-3


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CASES, ids=CASE_IDS)
def test_left_padded_batch(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=5)
    lengths = [11, 7, 4]
    t = max(lengths)
    prompts = [random_ids(model, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    pad_id = model.spec.pad_token_id
    ids = torch.full((len(lengths), t), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for r, pr in enumerate(prompts):
        ids[r, t - len(pr):] = pr
        key_mask[r, t - len(pr):] = True
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    # Naive reference: pad keys masked for every query (pad query rows still see real keys).
    allowed = key_mask[:, None, :].expand(-1, t, -1)
    with torch.no_grad():
        got = model(ids, pos, key_mask=key_mask)
        ref = naive_forward(model, ids, pos, allowed=allowed)
    assert torch.isfinite(got).all()
    real = key_mask
    assert rel_err(got[real], ref[real]) < REL_TOL
    # Batch invariance: each padded row's real positions equal the prompt run alone, unpadded.
    with torch.no_grad():
        for r, pr in enumerate(prompts):
            alone = model(pr[None], arange_positions(1, len(pr)))[0]
            assert rel_err(got[r, t - len(pr):], alone) < REL_TOL, f"row {r}"
    # And the mask matters: without it the padded rows differ.
    with torch.no_grad():
        unmasked = model(ids, pos)
    assert rel_err(unmasked[2, t - lengths[2]:], got[2, t - lengths[2]:]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Cache semantics
# ---------------------------------------------------------------------------------------------


def _padded_batch(model, t: int, pad_lens: list[int], seed: int):
    ids = random_ids(model, (len(pad_lens), t), seed=seed)
    key_mask = torch.ones(len(pad_lens), t, dtype=torch.bool)
    for r, n in enumerate(pad_lens):
        ids[r, :n] = model.spec.pad_token_id
        key_mask[r, :n] = False
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, key_mask, pos


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_return_kv_shapes(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=6)
    ids = random_ids(model, (2, 10), seed=7)
    with torch.no_grad():
        logits, kv = model(ids, arange_positions(2, 10), return_kv=True)
        plain = model(ids, arange_positions(2, 10))
    assert torch.equal(logits, plain)
    assert len(kv) == model.spec.num_layers
    for k, v in kv:
        assert k.shape == (2, kv_heads, 10, model.spec.head_dim)
        assert v.shape == (2, kv_heads, 10, model.spec.head_dim)


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_dual_cache_step_unchanged_tokens_is_exact(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=8)
    t, s, e = 20, 8, 14
    ids, key_mask, pos = _padded_batch(model, t, [0, 3], seed=9)
    with torch.no_grad():
        full, kv = model(ids, pos, key_mask=key_mask, return_kv=True)
        step, kv2 = model(ids[:, s:e], pos[:, s:e], key_mask=key_mask, past=kv, splice=(s, e),
                          return_kv=True)
    assert step.shape == (2, e - s, model.spec.vocab_size)
    assert rel_err(step, full[:, s:e]) < REL_TOL
    # The returned key set is the whole sequence again, equal to the full forward's.
    for (k, v), (k2, v2) in zip(kv, kv2):
        assert k2.shape == k.shape and v2.shape == v.shape
        assert rel_err(k2, k) < REL_TOL and rel_err(v2, v) < REL_TOL


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_prefix_cache_step_unchanged_tokens_is_exact(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=10)
    t, s = 20, 9
    ids, key_mask, pos = _padded_batch(model, t, [0, 4], seed=11)
    with torch.no_grad():
        full, kv = model(ids, pos, key_mask=key_mask, return_kv=True)
        prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
        step = model(ids[:, s:], pos[:, s:], key_mask=key_mask, past=prefix)
    assert step.shape == (2, t - s, model.spec.vocab_size)
    assert rel_err(step, full[:, s:]) < REL_TOL


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_dual_cache_splice_replaces_block_keys(fmt, heads, kv_heads, extra):
    """A dual-cache step with *new* block tokens is not a full forward (the rest of the cache is
    stale), but the returned key set must be the old cache with the block's keys replaced."""
    model = make_model(fmt, heads, kv_heads, extra, seed=12)
    t, s, e = 16, 5, 10
    ids = random_ids(model, (1, t), seed=13)
    pos = arange_positions(1, t)
    new = ids.clone()
    new[:, s:e] = random_ids(model, (1, e - s), seed=14)
    with torch.no_grad():
        _, kv = model(ids, pos, return_kv=True)
        _, kv_new_full = model(new, pos, return_kv=True)
        _, kv_step = model(new[:, s:e], pos[:, s:e], past=kv, splice=(s, e), return_kv=True)
    # Layer 0 keys/values depend only on the token and its position: the spliced block equals the
    # full forward of the new sequence there, and the rest is the old cache untouched.
    k0, v0 = kv_step[0]
    assert torch.allclose(k0[:, :, s:e], kv_new_full[0][0][:, :, s:e], atol=1e-6)
    assert torch.allclose(v0[:, :, s:e], kv_new_full[0][1][:, :, s:e], atol=1e-6)
    assert torch.equal(k0[:, :, :s], kv[0][0][:, :, :s]) and torch.equal(k0[:, :, e:], kv[0][0][:, :, e:])


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_branches_with_block_diagonal_attn_mask(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=15)
    t, s, e = 18, 6, 11
    blk = e - s
    ids, key_mask, pos = _padded_batch(model, t, [0, 2], seed=16)
    b = ids.shape[0]
    branch0 = ids[:, s:e]
    branch1 = random_ids(model, (b, blk), seed=17)
    with torch.no_grad():
        full, kv = model(ids, pos, key_mask=key_mask, return_kv=True)
        single0 = model(branch0, pos[:, s:e], key_mask=key_mask, past=kv, splice=(s, e))
        single1 = model(branch1, pos[:, s:e], key_mask=key_mask, past=kv, splice=(s, e))

        # Key set after splicing 2K rows over [s, e): [prefix | branch0 | branch1 | suffix].
        n_keys = t + blk
        q_ids = torch.cat([branch0, branch1], dim=1)
        q_pos = torch.cat([pos[:, s:e], pos[:, s:e]], dim=1)
        wide_key_mask = torch.cat([key_mask[:, :s], key_mask[:, s:e], key_mask[:, s:e], key_mask[:, e:]], dim=1)
        attn = torch.zeros(1, 2 * blk, n_keys, dtype=torch.bool)
        attn[:, :, :s] = True  # prefix
        attn[:, :, s + 2 * blk:] = True  # suffix
        attn[:, :blk, s:s + blk] = True  # branch0 sees itself
        attn[:, blk:, s + blk:s + 2 * blk] = True  # branch1 sees itself
        both = model(q_ids, q_pos, key_mask=wide_key_mask, past=kv, splice=(s, e), attn_mask=attn)
    assert both.shape == (b, 2 * blk, model.spec.vocab_size)
    # Dual-cache step on the original block equals the full forward; branch 0 equals both.
    assert rel_err(single0, full[:, s:e]) < REL_TOL
    assert rel_err(both[:, :blk], single0) < REL_TOL
    assert rel_err(both[:, blk:], single1) < REL_TOL
    # The branches really differ (otherwise the test would be vacuous).
    assert rel_err(single1, single0) > 1e-3


# ---------------------------------------------------------------------------------------------
# bf16 smoke
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", [CASES[1], CASES[5]], ids=[CASE_IDS[1], CASE_IDS[5]])
def test_bf16_close_to_fp32(fmt, heads, kv_heads, extra):
    model = make_model(fmt, heads, kv_heads, extra, seed=18)
    ids, key_mask, pos = _padded_batch(model, 16, [0, 5], seed=19)
    with torch.no_grad():
        ref = model(ids, pos, key_mask=key_mask)
        model_bf16 = model.to(torch.bfloat16)
        got, kv = model_bf16(ids, pos, key_mask=key_mask, return_kv=True)
        # The cached paths also run in bf16.
        step = model_bf16(ids[:, 4:9], pos[:, 4:9], key_mask=key_mask, past=kv, splice=(4, 9))
    assert got.dtype == torch.bfloat16 and kv[0][0].dtype == torch.bfloat16
    assert torch.isfinite(got).all() and torch.isfinite(step).all()
    real = key_mask
    diff = (got.float() - ref)[real].abs().max()
    assert diff / ref[real].abs().max() < 5e-2
    assert (step.float() - got[:, 4:9].float()).abs().max() / ref.abs().max() < 5e-2
