"""The DCU cost benchmark's dense steps compute what they claim (vllm_odb/bench/dcu_cost.py)."""

import pytest
import torch

from vllm_odb.bench.dcu_cost import Steps, feature_bytes_per_token, per_block
from vllm_odb.policies import DecodeConfig
from vllm_odb.reference.dcu import DCUForward
from vllm_odb.reference.model import load_model

CHECKPOINTS = ["checkpoints/tiny-llada", "checkpoints/tiny-dream"]


def _canvas(model, plen=12, glen=32, seed=0):
    spec = model.spec
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (2, plen + glen), generator=gen)
    return torch.where(ids == spec.mask_token_id, ids + 1, ids)


@pytest.mark.parametrize("path", CHECKPOINTS)
@torch.no_grad()
def test_refresh_and_decode_are_the_reference_forwards(path):
    model = load_model(path)
    ids = _canvas(model)
    steps = Steps(model, ids.clone(), plen=12, s=20, block=8, window=8, budget=8)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    full = model(ids, pos, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(steps.refresh(), full, rtol=1e-4, atol=1e-4)
    # the block changes, then one decode step against the refreshed cache: the reference's dual step
    _, cache = model(ids, pos, torch.ones_like(ids, dtype=torch.bool), return_kv=True)
    steps.ids[:, 20:28] = _canvas(model, seed=1)[:, 20:28]
    want = model(steps.ids[:, 20:28], pos[:, 20:28], torch.ones_like(ids, dtype=torch.bool), past=cache, splice=(20, 28))
    torch.testing.assert_close(steps.decode(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", CHECKPOINTS)
@pytest.mark.parametrize("budget", [32, 4])
@torch.no_grad()
def test_dcu_step_is_the_reference_dcu_forward(path, budget):
    """After a full forward the block changes; the dense DCU step's block logits equal the
    reference engine's DCU forward (reference/dcu.py) when both choose the same tokens: every
    response token (budget 32 covers the response), or the window plus the same top-4."""
    model = load_model(path)
    plen, glen, s, e = 12, 32, 20, 28
    ids = _canvas(model, plen, glen)
    steps = Steps(model, ids.clone(), plen=plen, s=s, block=e - s, window=8, budget=budget)
    steps.refresh()
    cfg = DecodeConfig.for_method("dynamic-dcu", gen_length=glen, block_length=e - s, dcu_window=8,
                                  dcu_layer_budget=budget)
    ref = DCUForward(model, cfg, plen, model.spec.mask_token_id)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    key_mask = torch.ones_like(ids, dtype=torch.bool)
    masked = ids.clone()
    masked[:, s:e] = model.spec.mask_token_id
    ref(masked, pos, key_mask)
    steps.ids.copy_(masked)
    steps.refresh()
    # commit the block's first token: the reference's key token (window centre) is that column
    new = masked.clone()
    new[:, s] = ids[:, s]
    steps.ids.copy_(new)
    win = steps.win_cols + plen
    assert win.min() <= s < win.max() + 1
    got = steps.dcu()
    want = ref(new, pos, key_mask)[:, s:e]
    if budget >= glen:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # same window (centred on the committed column) and the same uniform first budget
        ref_win = torch.arange(max(s - plen - 4, 0), max(s - plen - 4, 0) + 8) + plen
        assert torch.equal(win, ref_win)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_per_block_crossover_and_feature_bytes():
    rows = per_block(refresh_ms=30.0, decode_ms=10.0, dcu_ms=12.0)
    assert [r["forwards_per_block"] for r in rows] == [1, 2, 4, 8, 16, 32]
    assert rows[0]["dcu_over_dual"] == pytest.approx(0.4)  # one forward: DCU skips the refresh
    assert rows[-1]["dual_ms"] == pytest.approx(30 + 31 * 10)
    model = load_model("checkpoints/tiny-dream")
    fb = feature_bytes_per_token(model.spec)
    spec = model.spec
    assert fb["kv_cache"] == 2 * spec.num_kv_heads * spec.head_dim * spec.num_layers * 2
    assert fb["dcu_features"] == fb["kv_cache"] + 2 * spec.hidden_size * spec.num_layers * 2
