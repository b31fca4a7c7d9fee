"""The benchmarks' research-layout attention (vllm_odb/bench/research.py), attached to the
reference model through ``DiffusionLM.forward_override``: the research code's cache layout, the
plain layout's numbers."""

from __future__ import annotations

import pytest
import torch

from test_models import CACHE_CASES, CACHE_IDS, REL_TOL, _padded_batch, make_model, random_ids, rel_err
from vllm_odb.bench.research import attention_impl, key_positions, set_attention_impl
from vllm_odb.reference.model import DiffusionLM, apply_rope, rope_tables


def _research_twin(model: DiffusionLM) -> DiffusionLM:
    twin = DiffusionLM(model.spec)
    twin.load_state_dict(model.state_dict())
    set_attention_impl(twin, "research")
    return twin.eval()


@pytest.mark.parametrize("fmt,heads,kv_heads,extra", CACHE_CASES, ids=CACHE_IDS)
def test_research_impl_matches_plain_on_every_cache_mode(fmt, heads, kv_heads, extra):
    """No cache, dual cache (new block tokens, left-padded batch) and prefix cache give the plain
    impl's logits; the research cache holds keys before RoPE and the dual step writes into it."""
    model = make_model(fmt, heads, kv_heads, extra, seed=30)
    research = _research_twin(model)
    t, s, e = 20, 8, 13
    ids, key_mask, pos = _padded_batch(model, t, [0, 3], seed=31)
    new_block = random_ids(model, (2, e - s), seed=32)
    with torch.no_grad():
        full, kv = model(ids, pos, key_mask=key_mask, return_kv=True)
        full_r, kv_r = research(ids, pos, key_mask=key_mask, return_kv=True)
        assert rel_err(full_r, full) < REL_TOL
        cos, sin = rope_tables(pos, model.spec.head_dim, model.spec.rope_theta)
        for (k, v), (kr, vr) in zip(kv, kv_r):  # un-rotated keys: rotating them gives the plain cache
            assert rel_err(apply_rope(kr, cos, sin, model.spec.rope_in_fp32), k) < REL_TOL
            assert rel_err(vr, v) < REL_TOL
        assert torch.equal(key_positions(key_mask, 2, t, "cpu"), pos)

        step = model(new_block, pos[:, s:e], key_mask=key_mask, past=kv, splice=(s, e))
        before = kv_r[0][0].clone()
        step_r = research(new_block, pos[:, s:e], key_mask=key_mask, past=kv_r, splice=(s, e))
        assert rel_err(step_r, step) < REL_TOL
        assert rel_err(step_r, full[:, s:e]) > 1e-3  # the block really changed
        # In place: the block's rows of the research cache now hold the new tokens' keys.
        after = kv_r[0][0]
        assert not torch.equal(after[:, :, s:e], before[:, :, s:e])
        assert torch.equal(after[:, :, :s], before[:, :, :s]) and torch.equal(after[:, :, e:], before[:, :, e:])

        prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
        prefix_r = [(k[:, :, :s].clone(), v[:, :, :s].clone()) for k, v in research(ids, pos, key_mask, return_kv=True)[1]]
        tail = model(ids[:, s:], pos[:, s:], key_mask=key_mask, past=prefix)
        tail_r = research(ids[:, s:], pos[:, s:], key_mask=key_mask, past=prefix_r)
        assert rel_err(tail_r, tail) < REL_TOL and rel_err(tail_r, full[:, s:]) < REL_TOL


def test_research_impl_refuses_what_the_research_code_lacks():
    model = _research_twin(make_model("llada", 4, 2, seed=33))
    ids, key_mask, pos = _padded_batch(model, 12, [0, 0], seed=34)
    with torch.no_grad():
        _, kv = model(ids, pos, key_mask=key_mask, return_kv=True)
        with pytest.raises(ValueError, match="attn_mask"):
            model(ids[:, 4:8], pos[:, 4:8], key_mask=key_mask, past=kv, splice=(4, 8),
                  attn_mask=torch.ones(2, 4, 12, dtype=torch.bool))
        with pytest.raises(ValueError, match="splices as many rows"):
            model(ids[:, 4:10], pos[:, 4:10], key_mask=key_mask, past=kv, splice=(4, 8))
    with pytest.raises(ValueError, match="attention_impl 'fast'"):
        set_attention_impl(model, "fast")
    assert attention_impl(model) == "research"
    set_attention_impl(model, "plain")
    assert attention_impl(model) == "plain" and model.forward_override is None
