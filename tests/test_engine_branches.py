"""Jump-share on the paged cache (engine/model_state.py ``BranchAttention``, engine/requests.py
``JumpPlan``), on CPU with real tensors: the draft rows' attention over a Triton-layout paged cache
equals the reference loop's mask over [prefix | all new rows | suffix]; plans follow the shared
policy rules."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")

from vllm_odb.engine.model_state import BranchAttention, BranchBatch, BranchRows, PagedCache  # noqa: E402
from vllm_odb.engine.requests import JumpPlan  # noqa: E402
from vllm_odb.policies import DecodeConfig  # noqa: E402
from vllm_odb.policies.jump import DraftBudget, plan_drafts, positions_bound  # noqa: E402
from vllm_odb.policies.step import block_step, branch_step, plan_branches  # noqa: E402

MASK = 99
H, D, KBS, NUM_BLOCKS = 2, 8, 4, 16


def _cfg(**kw):
    return DecodeConfig(gen_length=16, block_length=4, jump=True, rule="threshold", cache="dual", **kw)


def _plan(shift, ridge_rows=64, masked=(1, 1, 1, 1), rows=40):
    """A plan laid out in ``rows`` rows (past its real ones: padding, as the engine's step width gives)."""
    g = torch.Generator().manual_seed(0)
    block = torch.where(torch.tensor(masked, dtype=torch.bool), MASK, 5)
    x0 = torch.randint(0, 50, (4,), generator=g)
    conf = torch.rand(4, generator=g)
    before = torch.tensor([7] * shift, dtype=torch.long)
    return JumpPlan.plan(block, before, x0, conf, MASK, _cfg(ridge_rows=ridge_rows), 1, rows)


def _real(plan) -> int:
    """A plan's real rows: its window and its valid drafts' rows (the rest is padding)."""
    return plan.window + int(plan.drafts)


def _request(shift, masked, ridge_rows, prompt, seed):
    """One planned request: its plan, sequence keys/values (the window's base rows wrote theirs this
    step), new rows' q/k/v and the reference loop's attention output for them."""
    torch.manual_seed(seed)
    plan = _plan(shift, ridge_rows=ridge_rows, masked=masked)
    assert plan is not None and plan.num_rows > _real(plan) > plan.window  # drafts and padding
    end = prompt + 8
    s, e = prompt, prompt + 4
    q0 = s - shift
    w, q = plan.window, plan.num_rows
    k_seq, v_seq = torch.randn(end, H, D), torch.randn(end, H, D)
    q_new, k_new, v_new = torch.randn(q, H, D), torch.randn(q, H, D), torch.randn(q, H, D)
    k_seq[q0:e], v_seq[q0:e] = k_new[:w], v_new[:w]
    # Reference (reference/generate.py branch_forward): keys [prefix | new rows | suffix].
    keys = torch.cat([k_seq[:q0], k_new, k_seq[e:]])
    vals = torch.cat([v_seq[:q0], v_new, v_seq[e:]])
    mask = torch.ones(q, keys.shape[0], dtype=torch.bool)
    mask[:, q0:q0 + q] = plan.attn
    ref = F.scaled_dot_product_attention(q_new.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         vals.transpose(0, 1)[None], attn_mask=mask[None, None], scale=D ** -0.5)
    return types.SimpleNamespace(plan=plan, q0=q0, end=end, seq=(k_seq, v_seq), new=(q_new, k_new, v_new),
                                 ref=ref[0].transpose(0, 1).reshape(q, H * D), real=_real(plan))


def _check_rows(out, reqs, firsts):
    """Each request's real draft rows are its reference's; its padding rows (written by the SDPA
    route, left by the kernel) are finite; no row outside the requests' draft slots is written."""
    written = torch.zeros(out.shape[0], dtype=torch.bool)
    for r, first in zip(reqs, firsts):
        w, q = r.plan.window, r.plan.num_rows
        torch.testing.assert_close(out[first + w:first + r.real], r.ref[w:r.real])
        assert torch.isfinite(out[first + r.real:first + q]).all()
        written[first + w:first + q] = True
    assert out[~written].abs().sum() == 0


def _run(reqs, gap=2, triton_route=False, buffers=None):
    """The requests' rows in one batch (``gap`` kernel-only rows before each), their sequences in
    one paged cache at disjoint random blocks; the wrapper's output and each request's first row.
    ``triton_route``: the Triton kernel (engine/draft_attention.py) instead of the SDPA route;
    ``buffers`` (a ``DraftBuffers``): its layout copied there and launched over their capacity, as
    a step captured in a FULL CUDA graph runs it."""
    blocks = torch.randperm(NUM_BLOCKS)
    cache = torch.zeros(NUM_BLOCKS, H, KBS, 2 * D)
    tables, firsts, used, row = [], [], 0, 0
    for r in reqs:
        n = (r.end + KBS - 1) // KBS
        table = torch.cat([blocks[used:used + n], torch.zeros(4, dtype=torch.long)])[:6]  # rows padded
        used += n
        k_seq, v_seq = r.seq
        for p in range(r.end):
            cache[table[p // KBS], :, p % KBS, :D] = k_seq[p]
            cache[table[p // KBS], :, p % KBS, D:] = v_seq[p]
        tables.append(table)
        firsts.append(row + gap)
        row += gap + r.plan.num_rows
    query, key, value = torch.zeros(row + gap, H, D), torch.zeros(row + gap, H, D), torch.zeros(row + gap, H, D)
    for r, first in zip(reqs, firsts):
        q = r.plan.num_rows
        query[first:first + q], key[first:first + q], value[first:first + q] = r.new
    layer = types.SimpleNamespace(num_heads=H, num_kv_heads=H, head_size=D, impl=types.SimpleNamespace(scale=D ** -0.5))

    def kernel(layer, query, key, value, kv_cache, meta, output, *a, **k):
        return output.fill_(0)

    wrapper = BranchAttention(kernel, PagedCache(kernel_block_size=KBS))
    rows = [BranchRows(first=f, plan=r.plan, q0=r.q0, end=r.end) for r, f in zip(reqs, firsts)]
    wrapper.batches = BranchBatch.build(rows, torch.stack(tables), KBS, "cpu", kernel=triton_route)
    if buffers is not None:
        (batch,) = wrapper.batches
        buffers.fill(batch.kernel)
        batch.kernel = buffers.rows
    out = torch.zeros(row + gap, H * D)
    wrapper(layer, query, key, value, cache, object(), out)
    return out, firsts


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("masked, ridge_rows", [((1, 1, 1, 1), 64), ((1, 0, 1, 1), 64), ((1, 0, 1, 1), 14),
                                               ((1, 0, 0, 1), 9)])
def test_draft_rows_see_exactly_the_reference_keys(shift, masked, ridge_rows):
    r = _request(shift, masked, ridge_rows, prompt=6, seed=1)
    out, firsts = _run([r], gap=3)
    _check_rows(out, [r], firsts)


@pytest.mark.parametrize("shift", [0, 1])
def test_several_planned_requests_in_one_call(shift):
    """Requests of different lengths and draft counts, batched in one padded call: each one's
    draft rows equal its own reference; no other row is written."""
    _three_requests_in_one_call(shift, triton_route=False)


def _three_requests_in_one_call(shift, triton_route):
    reqs = [_request(shift, m, rr, prompt=p, seed=i) for i, (m, rr, p) in
            enumerate([((1, 1, 1, 1), 64, 6), ((1, 0, 0, 1), 9, 11), ((1, 0, 1, 1), 14, 3)])]
    assert len({r.real for r in reqs}) > 1 and len({r.end for r in reqs}) > 1
    out, firsts = _run(reqs, triton_route=triton_route)
    _check_rows(out, reqs, firsts)


def test_the_sdpa_route_in_chunks_gives_the_same_rows(monkeypatch):
    """Under a small key cap the padded SDPA call is cut into chunks (its memory is bounded):
    every request's draft rows stay its reference's."""
    from vllm_odb.engine import model_state

    monkeypatch.setattr(model_state, "_SDPA_KEYS", 30)
    r = [_request(0, (1, 1, 1, 1), 64, prompt=p, seed=i) for i, p in enumerate((6, 11, 3))]
    rows = [BranchRows(first=0, plan=x.plan, q0=x.q0, end=x.end) for x in r]
    assert len(BranchBatch.build(rows, torch.zeros(3, 6, dtype=torch.long), KBS, "cpu", kernel=False)) > 1
    _three_requests_in_one_call(0, triton_route=False)


@pytest.mark.parametrize("triton_route", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="run under the interpreter by the slow test"))])
def test_a_plan_without_draft_rows_is_left_out_with_its_block_table(triton_route):
    """A plan whose rows are all the base window has nothing for the side path: it is dropped, and
    the next request keeps its own block table (not the dropped one's)."""
    r = _request(0, (1, 0, 1, 1), 64, prompt=6, seed=1)
    out, (first,) = _run([r], gap=3, triton_route=triton_route)  # the reference placement
    k_seq, v_seq = r.seq
    blocks = torch.randperm(NUM_BLOCKS)
    table = torch.cat([blocks[:4], torch.zeros(2, dtype=torch.long)])
    cache = torch.zeros(NUM_BLOCKS, H, KBS, 2 * D)
    for p in range(r.end):
        cache[table[p // KBS], :, p % KBS, :D], cache[table[p // KBS], :, p % KBS, D:] = k_seq[p], v_seq[p]
    empty = BranchRows(first=0, plan=types.SimpleNamespace(num_rows=4, window=4), q0=0, end=9)
    rows = [empty, BranchRows(first=first, plan=r.plan, q0=r.q0, end=r.end)]
    wrapper = BranchAttention(lambda *a, **k: None, PagedCache(kernel_block_size=KBS))
    wrapper.batches = BranchBatch.build(rows, torch.stack([torch.randperm(NUM_BLOCKS)[:6], table]), KBS, "cpu",
                                        kernel=triton_route)
    q_new, k_new, v_new = r.new
    query, key, value = (torch.zeros(out.shape[0], H, D) for _ in range(3))
    q = r.plan.num_rows
    query[first:first + q], key[first:first + q], value[first:first + q] = q_new, k_new, v_new
    layer = types.SimpleNamespace(num_heads=H, num_kv_heads=H, head_size=D, impl=types.SimpleNamespace(scale=D ** -0.5))
    got = torch.zeros_like(out)
    wrapper(layer, query, key, value, cache, object(), got)
    torch.testing.assert_close(got, out)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETED, reason="run by test_the_kernel_route_under_the_triton_interpreter")
@pytest.mark.parametrize("shift, splits", [(0, "1"), (1, "4")])
def test_kernel_route_inner(shift, splits, monkeypatch):
    """The Triton route on the same cases: one request of each mask kind, then three in one launch;
    in one program per row tile, and with the keys split in four (partials, then the merge)."""
    from vllm_odb.engine.draft_attention import SPLITS_ENV

    monkeypatch.setenv(SPLITS_ENV, splits)
    for masked, ridge_rows in [((1, 1, 1, 1), 64), ((1, 0, 1, 1), 64), ((1, 0, 1, 1), 14), ((1, 0, 0, 1), 9)]:
        r = _request(shift, masked, ridge_rows, prompt=6, seed=1)
        out, firsts = _run([r], gap=3, triton_route=True)
        _check_rows(out, [r], firsts)
        assert out[firsts[0] + r.real:].abs().sum() == 0  # the kernel computes no padding row
    _three_requests_in_one_call(shift, triton_route=True)


@pytest.mark.skipif(not INTERPRETED, reason="run by test_the_kernel_route_under_the_triton_interpreter")
def test_kernel_route_inner_in_fixed_buffers(monkeypatch):
    """The launch a FULL CUDA graph captures: the step's layout copied into buffers of fixed size
    (more requests, rows, window and blocks than it needs, the last step's layout left behind) and
    the kernel over the tiles a step of its rows can need (fewer than the buffers hold): the same
    rows as the step's own launch, no other row written. Keys split in two."""
    from vllm_odb.engine.draft_attention import SPLITS_ENV, DraftBuffers

    monkeypatch.setenv(SPLITS_ENV, "2")

    buffers = DraftBuffers(capacity=20, max_draft=40, window=5, blocks=10, device="cpu")
    assert buffers.rows.tiles.shape[0] == 40 > 12  # the launch is cut to the bound of the step's rows
    cases = [((1, 1, 1, 1), 64, 6), ((1, 0, 0, 1), 9, 11), ((1, 0, 1, 1), 14, 3)]
    for n, seed in ((3, 0), (2, 5)):  # three requests, then two others: they must not read what it left
        reqs = [_request(1, m, rr, prompt=p, seed=seed + i) for i, (m, rr, p) in enumerate(cases[:n])]
        want, _ = _run(reqs, triton_route=True)
        got, _ = _run(reqs, triton_route=True, buffers=buffers)
        torch.testing.assert_close(got, want)
        assert int((buffers.rows.n_draft > 0).sum()) == n


@pytest.mark.skipif(not INTERPRETED, reason="run by test_the_kernel_route_under_the_triton_interpreter")
@pytest.mark.parametrize("splits", ["1", "8"])
def test_kernel_route_inner_gqa_and_long_keys(splits, monkeypatch):
    """Grouped KV heads (Dream), keys spanning several key tiles, a head dim below the tile: the
    Triton route equals the SDPA route on the real draft rows, keys split or not (eight splits of
    70 keys: empty ones too)."""
    from vllm_odb.engine.draft_attention import SPLITS_ENV

    monkeypatch.setenv(SPLITS_ENV, splits)
    torch.manual_seed(3)
    heads, kv_heads, dim, kbs, blocks = 4, 2, 12, 4, 40
    plans = [_plan(1, ridge_rows=64), _plan(1, ridge_rows=14, masked=(1, 0, 1, 1))]
    ends, q0s, firsts, row = [70, 45], [60, 30], [], 1
    for p in plans:
        firsts.append(row)
        row += p.num_rows + 1
    query, key, value = torch.randn(row, heads, dim), torch.randn(row, kv_heads, dim), torch.randn(row, kv_heads, dim)
    cache = torch.randn(blocks, kv_heads, kbs, 2 * dim)
    tables = torch.stack([torch.randperm(blocks)[:20] for _ in plans])
    rows = [BranchRows(first=f, plan=p, q0=q0, end=e) for f, p, q0, e in zip(firsts, plans, q0s, ends)]
    layer = types.SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_size=dim,
                                  impl=types.SimpleNamespace(scale=dim ** -0.5))
    outs = []
    for kernel in (False, True):
        wrapper = BranchAttention(lambda *a, **k: None, PagedCache(kernel_block_size=kbs))
        wrapper.batches = BranchBatch.build(rows, tables, kbs, "cpu", kernel=kernel)
        out = torch.zeros(row, heads * dim)
        wrapper(layer, query.reshape(row, -1), key.reshape(row, -1), value.reshape(row, -1), cache, object(), out)
        outs.append(out)
    for p, f in zip(plans, firsts):
        real = slice(f + p.window, f + _real(p))
        torch.testing.assert_close(outs[1][real], outs[0][real])
        assert outs[0][real].abs().sum() > 0


@pytest.mark.slow
def test_the_kernel_route_under_the_triton_interpreter():
    """The Triton kernel for draft rows, run on the CPU by Triton's interpreter (the interpreter is
    chosen when the kernel is defined, hence a fresh process)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "kernel_route_inner or left_out"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "7 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def test_fixed_buffers_take_each_steps_layout_and_refuse_a_bigger_one():
    """``DraftBuffers.fill``: a step's layout lands in the first slots, the slots past it have no
    draft rows (a request that had drafts last step is not attended again), its row tiles come
    first and the rest are unused, and a layout the buffers cannot hold (or of another window:
    the captured tile bound counts on it) is refused by name, never cut."""
    from vllm_odb.engine.draft_attention import DraftBuffers, DraftRows, tile_map

    def layout(r, dd, w, b, seed):
        g = torch.Generator().manual_seed(seed)
        ints = torch.randint(1, 9, (4, r), generator=g, dtype=torch.int32)
        return DraftRows(torch.randint(0, 50, (r, b), generator=g, dtype=torch.int32),
                         torch.randint(0, 90, (r, dd), generator=g), ints[0], ints[1], ints[2], ints[3],
                         torch.randint(0, 2, (r, dd, w), generator=g, dtype=torch.int8),
                         torch.randint(0, 2, (r, dd, dd), generator=g, dtype=torch.int8), dd,
                         slots=np.full(r, dd))

    buffers = DraftBuffers(capacity=4, max_draft=12, window=5, blocks=7, device="cpu")
    for r, dd, w, b in [(3, 12, 5, 7), (1, 4, 5, 6)]:
        d = layout(r, dd, w, b, seed=r)
        buffers.fill(d)
        p = buffers.rows
        assert p.n_draft[:r].tolist() == d.n_draft.tolist() and p.n_draft[r:].eq(0).all()
        for mine, theirs in ((p.ends, d.ends), (p.q0, d.q0), (p.window, d.window)):
            assert mine[:r].tolist() == theirs.tolist()
        assert torch.equal(p.block_tables[:r, :b], d.block_tables) and torch.equal(p.rows[:r, :dd], d.rows)
        assert torch.equal(p.mask_w[:r, :dd, :w], d.mask_w) and torch.equal(p.mask_d[:r, :dd, :dd], d.mask_d)
        assert p.max_draft == 12 and p.rows.shape == (4, 12)
        tiles = p.tiles.tolist()  # every request's row tiles in the buffers' tile size, then unused ones
        assert tiles[:r * -(-dd // p.block_m)] == tile_map(np.full(r, dd), p.block_m).tolist()
        assert all(t == [-1, -1] for t in tiles[r * -(-dd // p.block_m):])
    for too_big in [(5, 4, 5, 6), (1, 13, 5, 6), (1, 4, 6, 6), (1, 4, 5, 8)]:
        with pytest.raises(RuntimeError, match="outgrow the captured buffers"):
            buffers.fill(layout(*too_big, seed=0))
    with pytest.raises(RuntimeError, match="window .3 rows. is not the captured buffers' .5."):
        buffers.fill(layout(1, 4, 3, 6, seed=0))
    buffers.clear()
    assert buffers.rows.n_draft.eq(0).all()


def test_the_route_is_chosen_by_name(monkeypatch):
    """``sdpa`` and ``triton`` force a route; ``auto``, the default, takes the kernel on CUDA for
    half-precision models only (fp32's IEEE products are emulated: SDPA is faster there)."""
    from vllm_odb.engine.draft_attention import ENV, kernel_selected

    for value, cuda in (("sdpa", False), ("triton", True)):
        monkeypatch.setenv(ENV, value)
        for dtype in (torch.float32, torch.bfloat16):
            assert kernel_selected("cuda", dtype) is cuda and (kernel_selected("cpu", dtype) is False or INTERPRETED)
    monkeypatch.delenv(ENV, raising=False)
    for dtype, cuda in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False), (None, False)):
        assert kernel_selected("cuda", dtype) is cuda and kernel_selected("cpu", dtype) is False
    monkeypatch.setenv(ENV, "flash")
    with pytest.raises(ValueError, match="VLLM_ODB_DRAFT_ATTENTION='flash'"):
        kernel_selected("cuda")


def test_a_layer_launches_the_same_ops_at_any_batch():
    """The per-layer side path is a fixed handful of ops, not a loop over requests (each op a
    launch on the GPU, 32 layers a step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (1, 3):
        reqs = [_request(0, (1, 1, 1, 1), 64, prompt=6, seed=i) for i in range(n)]
        out, firsts = _run(reqs)  # warm; then count one layer's call on the same batch
        rows = [BranchRows(first=f, plan=r.plan, q0=r.q0, end=r.end) for r, f in zip(reqs, firsts)]
        wrapper = BranchAttention(lambda *a, **k: None, PagedCache(kernel_block_size=KBS))
        wrapper.batches = BranchBatch.build(rows, torch.zeros(n, 6, dtype=torch.long), KBS, "cpu", kernel=False)
        layer = types.SimpleNamespace(num_heads=H, num_kv_heads=H, head_size=D, impl=types.SimpleNamespace(scale=1.0))
        t = torch.zeros(out.shape[0], H, D)
        with Count() as c:
            wrapper(layer, t, t, t, torch.zeros(NUM_BLOCKS, H, KBS, 2 * D), object(), out)
        counts.append(c.ops)
    assert counts[0] == counts[1] <= 16, counts


def test_no_rows_means_the_kernel_alone():
    calls = []
    wrapper = BranchAttention(lambda *a, **k: calls.append(1) or "kernel", PagedCache(kernel_block_size=KBS))
    assert BranchBatch.build([], torch.zeros(0, 6, dtype=torch.long), KBS, "cpu", kernel=False) == []
    assert wrapper(None, None, None, None, None, object(), None) == "kernel" and calls == [1]


def test_plan_follows_the_draft_budget():
    """The family is the largest any block could draft under the budget (``positions_bound``: a
    host number); the request's own p (policies.jump.plan_drafts, from its masks) says which of
    its drafts are valid. A budget that leaves no block a draft gives no plan."""
    assert _plan(0, ridge_rows=4) is None  # no room past the window, whatever the masks
    empty = _plan(0, ridge_rows=7)  # 4 + (2p-1)*m <= 7 drafts only a block of two masks
    assert empty.branches.family.shape == (1, 1) and int(empty.drafts) == 0 and not empty.branches.valid.any()
    plan = _plan(0, ridge_rows=64)
    p, _ = plan_drafts(DraftBudget(64, 8), 1, 4, torch.tensor([4]))
    bound = positions_bound(DraftBudget(64, 8), 1, 4, 4)
    assert bound >= int(p[0]) and plan.branches.family.shape == (2 * bound - 1, bound)
    assert int(plan.branches.valid.sum()) == 2 * int(p[0]) - 1
    assert plan.branches.blocks.shape == (1, 2 * bound, 4)


def test_plan_rows_fit_the_canvas():
    """A plan takes exactly the rows it is given; drafts that would need more are all dropped (the
    step is then its base branch alone), never cut."""
    plan = _plan(1, ridge_rows=64)
    assert plan.num_rows == 40 and _real(plan) <= 40 and plan.window == 5
    assert (plan.offsets[:5] == torch.arange(5)).all()  # the base window comes first, in order
    assert not plan.attn[_real(plan):].any() and not plan.attn[:, _real(plan):].any()  # padding sees no new row
    tight = JumpPlan.plan(torch.full((4,), MASK), torch.tensor([7]), torch.zeros(4, dtype=torch.long), torch.ones(4),
                          MASK, _cfg(ridge_rows=64), 1, _real(plan) - 1)
    assert tight.num_rows == _real(plan) - 1 and int(tight.drafts) == 0 and not tight.branches.valid.any()


@pytest.mark.parametrize("shift, masked, ridge_rows", [(0, (1, 0, 1, 1), 14), (1, (1, 0, 0, 1), 9)])
def test_the_cases_above_include_shared_kv_drafts(shift, masked, ridge_rows):
    plan = _plan(shift, ridge_rows=ridge_rows, masked=masked)
    assert _real(plan) < plan.window * (1 + int(plan.branches.valid.sum()))  # drafts hold only some offsets


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_route_on_cuda_at_full_size(dtype):
    """On the GPU, LLaDA-8B's shapes (32 heads of 128, kernel blocks of 16; 7 planned requests with
    1.2-1.6k keys and a block of 32 planned at the whole 251-row budget each): the Triton route
    equals the SDPA route; both are timed
    (printed: the speed comparison belongs to the benchmarks, not to an assertion)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = "cuda"
    torch.manual_seed(0)
    heads, kv_heads, dim, kbs, blocks = 32, 32, 128, 16, 1024
    cfg = DecodeConfig(gen_length=64, block_length=32, jump=True, rule="threshold", cache="dual", ridge_rows=251)
    plans = []
    for i in range(7):  # blocks of 32 with 20-31 masked positions: the full draft budget of one request
        g = torch.Generator().manual_seed(i)
        block = torch.where(torch.rand(32, generator=g) < 0.8, MASK, 5).to(dev)
        block[0] = MASK
        plans.append(JumpPlan.plan(block, torch.zeros(0, dtype=torch.long, device=dev),
                                   torch.randint(0, 50, (32,), generator=g).to(dev),
                                   torch.rand(32, generator=g).to(dev),
                                   MASK, cfg, 1, 251))
    assert all(p is not None and _real(p) > 100 for p in plans), [p and _real(p) for p in plans]
    ends = [1200 + 60 * i for i in range(7)]
    q0s = [e - 600 for e in ends]
    firsts, row = [], 0
    for p in plans:
        firsts.append(row)
        row += 256
    query = torch.randn(row, heads * dim, device=dev, dtype=dtype)
    key = torch.randn(row, kv_heads * dim, device=dev, dtype=dtype)
    value = torch.randn(row, kv_heads * dim, device=dev, dtype=dtype)
    cache = torch.randn(blocks, kv_heads, kbs, 2 * dim, device=dev, dtype=dtype)
    tables = torch.stack([torch.randperm(blocks, device=dev)[:128] for _ in plans]).int()
    rows = [BranchRows(first=f, plan=p, q0=q0, end=e) for f, p, q0, e in zip(firsts, plans, q0s, ends)]
    layer = types.SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_size=dim,
                                  impl=types.SimpleNamespace(scale=dim ** -0.5))
    outs, ms = [], []
    for kernel in (False, True):
        wrapper = BranchAttention(lambda *a, **k: None, PagedCache(kernel_block_size=kbs))
        wrapper.batches = BranchBatch.build(rows, tables, kbs, dev, kernel=kernel)
        out = torch.zeros(row, heads * dim, device=dev, dtype=dtype)
        wrapper(layer, query, key, value, cache, object(), out)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(32):  # one step's layers
            wrapper(layer, query, key, value, cache, object(), out)
        stop.record()
        torch.cuda.synchronize()
        outs.append(out)
        ms.append(start.elapsed_time(stop))
    print(f"draft rows of 7 requests, 32 layers, {dtype}: SDPA route {ms[0]:.2f} ms, Triton route {ms[1]:.2f} ms")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for p, f in zip(plans, firsts):  # the real draft rows (the SDPA route also writes the padding rows)
        real = slice(f + p.window, f + _real(p))
        torch.testing.assert_close(outs[1][real].float(), outs[0][real].float(), **tol)


@pytest.mark.parametrize("shift", [0, 1])
def test_planning_a_batch_gives_each_request_its_own_plan(shift):
    """``JumpPlan.plan_many`` on blocks with different masks left (so different draft counts, one
    of them none) gives each request what ``plan_branches`` gives it alone (a batch of one, the
    budget of the same live count): rows, tokens, offsets, mask, its branches and their logit
    rows; and ``branch_step`` on logits favouring the drafted tokens decides alike from both. A
    request with no draft of its own gets its base branch alone, which decides as ``block_step``."""
    g = torch.Generator().manual_seed(5)
    k, n, vocab, live = 8, 5, 128, 2  # vocab past the mask id (99)
    masks = [(1,) * 8, (1, 0, 1, 1, 0, 0, 1, 0), (1, 1, 0, 1, 1, 1, 0, 1), (0, 0, 0, 1, 0, 0, 0, 0), (1, 0) * 4]
    block = torch.where(torch.tensor(masks, dtype=torch.bool), MASK, torch.randint(0, 50, (n, k), generator=g))
    before = torch.randint(0, 50, (n, shift), generator=g)
    x0, conf = torch.randint(0, 50, (n, k), generator=g), torch.rand(n, k, generator=g)
    # Dream's drafts take up to two rows a masked position (policies.jump.plan_drafts): a larger
    # budget gives it draft counts as varied as LLaDA's at 120
    cfg = DecodeConfig(gen_length=16, block_length=k, jump=True, rule="threshold", cache="dual",
                       ridge_rows=120 if shift == 0 else 160)
    many = JumpPlan.plan_many(block, before, x0, conf, MASK, cfg, live, 200)
    drafts, accepted, plain = set(), 0, 0
    for i, got in enumerate(many):
        one = slice(i, i + 1)
        assert got.num_rows == 200 and got.window == k + shift
        active = (block[one] == MASK).any(1)
        br = plan_branches(block[one], before[one], x0[one], conf[one], block[one] == MASK, cfg, live, drafts_only=True)
        if br is None or int(br.layout.num_rows[0]) == k + shift:  # no draft of its own: a plain step
            assert int(got.drafts) == 0 and not got.branches.valid.any()
            assert torch.equal(got.tokens[:k + shift], torch.cat([before[i], block[i]]))
            rows = torch.randn(200, k, vocab, generator=g)
            rows.scatter_(2, x0[i][None, :, None].expand(200, k, 1), torch.rand(200, k, 1, generator=g) * 12)
            def at(pred):  # noqa: E306 -- slot t's logits from row pred[.., t]
                return rows[pred, torch.arange(k)[None]]
            a = branch_step(at(got.pred_row)[None], got.branches, active, cfg, MASK)
            b = block_step(at(got.pred_row[:1]), block[one], block[one] == MASK, cfg, MASK)
            for x, y in ((a.block, b.block), (a.x0, b.x0), (a.conf, b.conf)):
                assert torch.equal(x, y)
            assert int(a.accepted[0]) == 0
            plain += 1
            continue
        lay, q, nb = br.layout, int(br.layout.num_rows[0]), br.blocks.shape[1]
        drafts.add(nb)
        assert q == k + shift + int(got.drafts)
        for a, b in ((got.tokens[:q], lay.tokens[0, :q]), (got.offsets[:q], lay.offset[0, :q]),
                     (got.attn[:q, :q], lay.attn[0, :q, :q]),
                     (got.pred_row[:nb], lay.pred_row[0]), (got.branches.blocks[:, :nb], br.blocks),
                     (got.branches.valid[:, :nb - 1], br.valid)):
            assert torch.equal(a, b)
        assert not got.attn[q:].any() and not got.attn[:, q:].any()  # padding rows: nothing new
        assert not got.branches.valid[:, nb - 1:].any()  # the batch's further drafts are not its own
        # Logits of its q rows: each row prefers the adopted predictions, at random confidence.
        rows = torch.randn(q, k, vocab, generator=g)
        rows.scatter_(2, x0[i][None, :, None].expand(q, k, 1), torch.rand(q, k, 1, generator=g) * 12)
        row_logits = rows[torch.arange(q)[:, None], torch.arange(k)[None]]  # [q, k, V]: row r at block slot t
        def lg(pred):  # noqa: E306 -- branch b's logits at slot t come from row pred[b, t]
            return row_logits[pred, torch.arange(k)[None]][None]
        a = branch_step(lg(got.pred_row), got.branches, active, cfg, MASK)
        b = branch_step(lg(lay.pred_row[0]), br, active, cfg, MASK)
        for x, y in ((a.block, b.block), (a.x0, b.x0), (a.conf, b.conf), (a.accepted, b.accepted)):
            assert torch.equal(x, y)
        accepted += int(a.accepted[0])
    assert len(drafts) > 1 and plain and accepted > 0  # unlike drafts, one request none, drafts adopted


def _batched_jump_engine_run():
    """Three suite requests at once on a jump-share engine (threshold 1.0), their responses and
    the reference loop's for each alone. The budget holds every request's largest plan (block 16:
    8 drafted positions, up to 497 rows with Dream's count), so a request drafts in the batch what
    it drafts alone: a smaller share takes the shared-KV layout, which reads the base branch's keys
    for the drafted positions and is not exact (tokens change on the worked checkpoints)."""
    from engine_emulator import EmulatedEngine, tiny_checkpoint

    from shipped import make_suite, roomy_ridge
    from vllm_odb.engine.knobs import engine_config
    from vllm_odb.reference.generate import generate, response_ids

    ck = tiny_checkpoint("llada")
    engine_cfg = engine_config({"odb": {"block_length": 16, "gen_length": 64, "method": "odb", "threshold": 1.0,
                                        "ridge_rows": roomy_ridge(16, DecodeConfig().max_draft_positions, 3)}})
    engine = EmulatedEngine(ck, engine_cfg, slots=3, max_model_len=2048)  # room for the wide canvas past a prompt
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(43, 3)]
    got = engine.generate(prompts, types.SimpleNamespace(temperature=0.0, max_tokens=64, extra_args=None, stop=None))
    refs = [generate(ck.model, [p], engine_cfg.replace(gen_length=64), ck.special) for p in prompts]
    return engine, got, [response_ids(r.tokens[0], ck.special) for r in refs]


def test_a_failing_batched_group_runs_its_requests_one_at_a_time(monkeypatch):
    """Should a batched decision or plan raise, its requests are redone one at a time: nothing
    fails and the responses are the reference's."""
    from vllm_odb.engine import sampler

    raised = []
    real_plan, real_step = JumpPlan.plan_many.__func__, sampler.branch_step

    def plan_many(cls, block, *a, **k):
        if block.shape[0] > 1:
            raised.append("plan")
            raise RuntimeError("batched planning")
        return real_plan(cls, block, *a, **k)

    def branch_step(logits, branches, *a, **k):
        if branches.blocks.shape[0] > 1:
            raised.append("step")
            raise RuntimeError("batched step")
        return real_step(logits, branches, *a, **k)

    monkeypatch.setattr(JumpPlan, "plan_many", classmethod(plan_many))
    monkeypatch.setattr(sampler, "branch_step", branch_step)
    engine, got, refs = _batched_jump_engine_run()
    assert got == refs and not engine.errors and engine.stats["drafts_accepted"] > 0
    assert {"plan", "step"} <= set(raised)


def test_a_batched_jump_share_engine_decodes_as_the_reference(monkeypatch):
    """Three requests at once on the jump-share engine, threshold 1.0 (drafts are then lossless):
    each response is the reference loop's alone, drafts are accepted, and the batch was planned
    and decided in groups of requests drafting unlike."""
    groups = []
    real = JumpPlan.plan_many.__func__

    def spy(cls, block, *a, **k):
        plans = real(cls, block, *a, **k)
        groups.append({int(p.branches.valid.sum()) for p in plans if p is not None})  # valid drafts: 2p - 1
        return plans

    monkeypatch.setattr(JumpPlan, "plan_many", classmethod(spy))
    engine, got, refs = _batched_jump_engine_run()
    assert got == refs
    assert engine.stats["drafts_accepted"] > 0
    assert any(len(g) > 1 for g in groups), groups


def _block_plan(ridge: int, seed: int, device) -> JumpPlan:
    """A block of 32 with about 80% of it masked, planned alone at ``ridge`` rows (it has drafts)."""
    cfg = DecodeConfig(gen_length=64, block_length=32, jump=True, rule="threshold", cache="dual", ridge_rows=ridge)
    g = torch.Generator().manual_seed(seed)
    block = torch.where(torch.rand(32, generator=g) < 0.8, MASK, 5).to(device)
    block[0] = MASK
    plan = JumpPlan.plan(block, torch.zeros(0, dtype=torch.long, device=device),
                         torch.randint(0, 50, (32,), generator=g).to(device), torch.rand(32, generator=g).to(device),
                         MASK, cfg, 1, ridge)
    assert plan is not None and int(plan.drafts) > 0
    return plan


@pytest.mark.gpu
def test_the_kernel_compiles_once_for_any_draft_count():
    """A jump-share engine's plans change size with the batch (knobs.step_width): the kernel must not
    compile again for each new size (a compile stalls the step for about a second). The first call
    compiles; calls with other draft counts (the same tile) must each take well under that."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import time

    from vllm_odb.engine.draft_attention import draft_rows_attention

    dev, heads, dim, kbs, blocks = "cuda", 4, 64, 16, 64
    cache = torch.randn(blocks, heads, kbs, 2 * dim, device=dev, dtype=torch.bfloat16)
    seconds = []
    for ridge in (64, 80, 96, 112, 128, 144):  # draft counts of 17 rows and more: one tile size
        plan = _block_plan(ridge, seed=ridge, device=dev)
        assert int(plan.drafts) > 16
        rows = [BranchRows(first=0, plan=plan, q0=300, end=400)]
        tables = torch.randperm(blocks, device=dev)[None, :32].int()
        d = BranchBatch.build(rows, tables, kbs, dev, kernel=True)[0].kernel
        q = torch.randn(plan.num_rows, heads, dim, device=dev, dtype=torch.bfloat16)
        out = torch.zeros(plan.num_rows, heads * dim, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        draft_rows_attention(q, q.clone(), q.clone(), cache, out, d, dim ** -0.5, kbs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    print("draft-row kernel calls (s):", [round(t, 4) for t in seconds])
    assert max(seconds[1:]) < 0.1, seconds


@pytest.mark.gpu
def test_the_kernel_over_fixed_buffers_replays_in_a_cuda_graph():
    """What VLLM_ODB_JUMP_GRAPHS=full relies on: the kernel captured once in a CUDA graph over
    ``DraftBuffers`` with no draft rows (as vLLM captures a step), then replayed after each step's
    layout is copied in, gives that step's own launch's rows; a replay after ``clear`` writes none."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vllm_odb.engine.draft_attention import DraftBuffers, draft_rows_attention

    dev, heads, dim, kbs, blocks, dtype = "cuda", 4, 64, 16, 64, torch.bfloat16
    torch.manual_seed(0)
    cache = torch.randn(blocks, heads, kbs, 2 * dim, device=dev, dtype=dtype)
    n = 320  # the step's token rows
    query, key, value = (torch.randn(n, heads, dim, device=dev, dtype=dtype) for _ in range(3))
    out = torch.zeros(n, heads * dim, device=dev, dtype=dtype)
    buffers = DraftBuffers(capacity=4, max_draft=160, window=32, blocks=40, device=dev)
    draft_rows_attention(query, key, value, cache, out, buffers.rows, dim ** -0.5, kbs)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        draft_rows_attention(query, key, value, cache, out, buffers.rows, dim ** -0.5, kbs)
    for seed, ridge in ((1, 96), (2, 160)):  # two steps with different layouts, the same graph
        plan = _block_plan(ridge, seed, dev)
        rows = [BranchRows(first=8, plan=plan, q0=300, end=400)]
        tables = torch.randperm(blocks, device=dev)[None, :40].int()
        step = BranchBatch.build(rows, tables, kbs, dev, kernel=True)[0].kernel
        want = torch.zeros_like(out)
        draft_rows_attention(query, key, value, cache, want, step, dim ** -0.5, kbs)
        buffers.fill(step)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want)
        assert out.abs().sum() > 0
    buffers.clear()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert out.abs().sum() == 0


def test_the_kernels_tiles_default_and_follow_the_variable(monkeypatch):
    """``draft_tiles``: 16 x 32 for a few draft rows, 32 x 64 otherwise (measured, BENCHMARKS.md);
    ``VLLM_ODB_DRAFT_TILES=m,n`` overrides them, and a bad value is refused by name."""
    from vllm_odb.engine.draft_attention import TILES_ENV, draft_tiles

    monkeypatch.delenv(TILES_ENV, raising=False)
    assert draft_tiles(16) == (16, 64) and draft_tiles(146) == (32, 64)
    monkeypatch.setenv(TILES_ENV, "64,32")
    assert draft_tiles(146) == (64, 32)
    for bad in ("64", "8,32", "a,b"):
        monkeypatch.setenv(TILES_ENV, bad)
        with pytest.raises(ValueError, match="VLLM_ODB_DRAFT_TILES"):
            draft_tiles(146)


def test_plans_of_different_windows_are_refused():
    """One step's planned requests share the engine's window; a mix is a bug, refused by name."""
    rows = [BranchRows(first=0, plan=_plan(0), q0=5, end=40), BranchRows(first=40, plan=_plan(1), q0=5, end=40)]
    for kernel in (False, True):
        with pytest.raises(ValueError, match="windows differ"):
            BranchBatch.build(rows, torch.zeros(2, 6, dtype=torch.long), KBS, "cpu", kernel=kernel)


def test_row_tiles_cover_each_requests_slots_and_stay_under_the_bound():
    """``tile_map``: every draft slot of every request in exactly one tile, tiles request by request;
    ``tiles_bound``: no layout of a step of T rows (each planned request its window and at least one
    draft row among them) needs more tiles than a FULL graph of T rows launches."""
    from vllm_odb.engine.draft_attention import tile_map, tiles_bound

    assert tile_map([5, 0, 3], 4).tolist() == [[0, 0], [0, 4], [2, 0]]
    assert tile_map([], 4).shape == (0, 2)
    g = np.random.default_rng(0)
    for _ in range(400):
        w, bm = int(g.integers(1, 40)), int(g.choice([16, 32, 64]))
        slots = g.integers(1, 200, size=int(g.integers(1, 12)))
        tokens = int((w + slots).sum() + g.integers(0, 50))
        tiles = tile_map(slots, bm)
        covered = [(r, f + i) for r, f in tiles for i in range(bm) if f + i < slots[r]]
        assert covered == [(r, m) for r in range(len(slots)) for m in range(slots[r])]
        assert len(tiles) <= tiles_bound(tokens, w, bm)
    assert tiles_bound(175, 32, 32) == 5 and tiles_bound(32, 32, 32) == 0


def test_key_splits_fill_the_gpu_then_stop(monkeypatch):
    """``draft_splits``: a power of two up to eight while the row tiles x heads leave SMs idle, one
    from four programs per SM on; ``VLLM_ODB_DRAFT_SPLITS`` sets it, a bad value refused by name;
    ``VLLM_ODB_DRAFT_TILES``' third value sets the warps, its fourth the pipelining stages."""
    from vllm_odb.engine.draft_attention import SPLITS_ENV, TILES_ENV, draft_splits, draft_stages, draft_warps

    monkeypatch.delenv(SPLITS_ENV, raising=False)
    monkeypatch.delenv(TILES_ENV, raising=False)
    assert [draft_splits(p, "cpu") for p in (1, 9, 17, 30, 64, 1000)] == [8, 8, 4, 2, 1, 1]  # 16 "SMs" off CUDA
    monkeypatch.setenv(SPLITS_ENV, "3")
    assert draft_splits(1000, "cpu") == 3
    for bad in ("0", "17", "two"):
        monkeypatch.setenv(SPLITS_ENV, bad)
        with pytest.raises(ValueError, match="VLLM_ODB_DRAFT_SPLITS"):
            draft_splits(10, "cpu")
    assert draft_warps() == 4 and draft_stages() is None
    monkeypatch.setenv(TILES_ENV, "32,64,8")
    assert draft_warps() == 8 and draft_stages() is None
    monkeypatch.setenv(TILES_ENV, "32,64,4,2")  # the fourth value: the key loop's pipelining stages
    assert draft_warps() == 4 and draft_stages() == 2
    for bad in ("32,64,3", "32,64,4,0", "32,64,4,6", "32,64,4,2,1"):
        monkeypatch.setenv(TILES_ENV, bad)
        with pytest.raises(ValueError, match="VLLM_ODB_DRAFT_TILES"):
            draft_warps()


def test_a_layout_without_row_tiles_is_refused_by_name():
    """A ``DraftRows`` built without its row tiles (only ``BranchBatch.build(kernel=True)`` and
    ``DraftBuffers`` make them) is refused before any launch, not met by an AttributeError."""
    from vllm_odb.engine.draft_attention import DraftRows, draft_rows_attention

    z = torch.zeros(1, dtype=torch.int32)
    d = DraftRows(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.long), z, z, z, z,
                  torch.zeros(1, 4, 4, dtype=torch.int8), torch.zeros(1, 4, 4, dtype=torch.int8), 4)
    q = torch.zeros(8, H, D)
    with pytest.raises(ValueError, match="no row tiles"):
        draft_rows_attention(q, q, q, torch.zeros(NUM_BLOCKS, H, KBS, 2 * D), torch.zeros(8, H * D), d, 1.0, KBS)
