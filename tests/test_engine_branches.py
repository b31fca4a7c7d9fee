"""Jump-share on the paged cache (engine/model_state.py ``BranchAttention``, engine/requests.py
``JumpPlan``), on CPU with real tensors: the draft rows' attention over a Triton-layout paged cache
equals the reference loop's mask over [prefix | all new rows | suffix]; plans follow the shared
policy rules."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")

from vllm_odb.engine.model_state import BranchAttention, BranchRows, PagedCache  # noqa: E402
from vllm_odb.engine.requests import JumpPlan  # noqa: E402
from vllm_odb.policies import DecodeConfig  # noqa: E402
from vllm_odb.policies.jump import DraftBudget, plan_drafts  # noqa: E402

MASK = 99
H, D, KBS, NUM_BLOCKS = 2, 8, 4, 16


def _cfg(**kw):
    return DecodeConfig(gen_length=16, block_length=4, jump=True, rule="threshold", cache="dual", **kw)


def _plan(shift, ridge_rows=64, masked=(1, 1, 1, 1)):
    g = torch.Generator().manual_seed(0)
    block = torch.where(torch.tensor(masked, dtype=torch.bool), MASK, 5)
    x0 = torch.randint(0, 50, (4,), generator=g)
    conf = torch.rand(4, generator=g)
    before = torch.tensor([7] * shift, dtype=torch.long)
    return JumpPlan.plan(block, before, x0, conf, MASK, _cfg(ridge_rows=ridge_rows), 1, 400)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("masked, ridge_rows", [((1, 1, 1, 1), 64), ((1, 0, 1, 1), 64), ((1, 0, 1, 1), 14),
                                               ((1, 0, 0, 1), 8)])
def test_draft_rows_see_exactly_the_reference_keys(shift, masked, ridge_rows):
    torch.manual_seed(1)
    plan = _plan(shift, ridge_rows=ridge_rows, masked=masked)
    assert plan is not None and plan.num_rows > plan.window
    prompt, end = 6, 14
    s, e = prompt, prompt + 4
    q0 = s - shift
    w, q = plan.window, plan.num_rows
    # The sequence's keys/values; the window's base rows wrote theirs this step.
    k_seq, v_seq = torch.randn(end, H, D), torch.randn(end, H, D)
    q_new, k_new, v_new = torch.randn(q, H, D), torch.randn(q, H, D), torch.randn(q, H, D)
    k_seq[q0:e], v_seq[q0:e] = k_new[:w], v_new[:w]
    table = torch.randperm(NUM_BLOCKS)[: (end + KBS - 1) // KBS]
    cache = torch.zeros(NUM_BLOCKS, H, KBS, 2 * D)
    for p in range(end):
        cache[table[p // KBS], :, p % KBS, :D] = k_seq[p]
        cache[table[p // KBS], :, p % KBS, D:] = v_seq[p]
    layer = types.SimpleNamespace(num_heads=H, num_kv_heads=H, head_size=D, impl=types.SimpleNamespace(scale=D ** -0.5))

    def kernel(layer, query, key, value, kv_cache, meta, output, *a, **k):
        return output.fill_(0)

    wrapper = BranchAttention(kernel, PagedCache(kernel_block_size=KBS))
    first = 3  # the request's rows start after another request's
    rows = first + q + 2
    query = torch.zeros(rows, H, D)
    key, value = torch.zeros(rows, H, D), torch.zeros(rows, H, D)
    query[first:first + q], key[first:first + q], value[first:first + q] = q_new, k_new, v_new
    wrapper.rows = [BranchRows(first=first, plan=plan, q0=q0, end=end, block_table=table)]
    out = torch.zeros(rows, H * D)
    wrapper(layer, query, key, value, cache, object(), out)
    # Reference (reference/generate.py branch_forward): keys [prefix | new rows | suffix].
    keys = torch.cat([k_seq[:q0], k_new, k_seq[e:]])
    vals = torch.cat([v_seq[:q0], v_new, v_seq[e:]])
    mask = torch.ones(q, keys.shape[0], dtype=torch.bool)
    mask[:, q0:q0 + q] = plan.attn
    ref = F.scaled_dot_product_attention(q_new.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         vals.transpose(0, 1)[None], attn_mask=mask[None, None], scale=D ** -0.5)
    ref = ref[0].transpose(0, 1).reshape(q, H * D)
    torch.testing.assert_close(out[first + w:first + q], ref[w:])
    assert out[:first].abs().sum() == 0 and out[first:first + w].abs().sum() == 0  # the kernel's rows untouched
    assert out[first + q:].abs().sum() == 0


def test_no_rows_means_the_kernel_alone():
    calls = []
    wrapper = BranchAttention(lambda *a, **k: calls.append(1) or "kernel", PagedCache(kernel_block_size=KBS))
    assert wrapper(None, None, None, None, None, object(), None) == "kernel" and calls == [1]


def test_plan_follows_the_draft_budget():
    """p comes from policies.jump.plan_drafts: a budget below two windows gives no plan."""
    assert _plan(0, ridge_rows=7) is None  # shared layout: 4 + (2p-1)*4 <= 7 has no p >= 1
    plan = _plan(0, ridge_rows=64)
    p, _ = plan_drafts(DraftBudget(64, 8), 1, 4, torch.tensor([4]))
    assert plan.branches.family.shape == (2 * int(p[0]) - 1, int(p[0]))
    assert plan.branches.blocks.shape == (1, 1 + plan.branches.family.shape[0], 4)


def test_plan_rows_fit_the_canvas():
    plan = _plan(1, ridge_rows=64)
    assert plan.num_rows <= 64 and plan.window == 5
    assert (plan.offsets[:5] == torch.arange(5)).all()  # the base window comes first, in order
    assert JumpPlan.plan(torch.full((4,), MASK), torch.tensor([7]), torch.zeros(4, dtype=torch.long), torch.ones(4),
                         MASK, _cfg(ridge_rows=64), 1, plan.num_rows - 1) is None


@pytest.mark.parametrize("shift, masked, ridge_rows", [(0, (1, 0, 1, 1), 14), (1, (1, 0, 0, 1), 8)])
def test_the_cases_above_include_shared_kv_drafts(shift, masked, ridge_rows):
    plan = _plan(shift, ridge_rows=ridge_rows, masked=masked)
    assert plan.num_rows < plan.window * plan.branches.blocks.shape[1]  # drafts hold only some offsets
