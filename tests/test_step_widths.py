"""A jump-share engine's canvas follows the batch (issue #22): ``knobs.step_width`` per batch size,
vLLM's own scheduler giving each request that many slots (patches/scheduler_lookahead.py sets its
per-batch-size table), and the sampler planning within them (engine/sampler.py)."""

from __future__ import annotations

import pytest
import torch

from vllm_odb.engine.knobs import canvas_width, step_width
from vllm_odb.policies import DecodeConfig


@pytest.mark.parametrize("shift", [0, 1])
def test_the_step_width_is_the_batch_share_of_the_draft_budget(shift):
    cfg = DecodeConfig(jump=True, block_length=32, ridge_rows=186)
    window, width = 32 + shift, canvas_width(cfg, shift)
    widths = [step_width(cfg, shift, b) for b in range(1, 65)]
    assert widths[0] == width  # batch 1: the whole canvas
    assert all(a >= b for a, b in zip(widths, widths[1:]))  # narrows as the batch grows
    assert all(window <= w <= width for w in widths)
    for b, w in enumerate(widths, 1):
        share = 186 // b
        assert w == max(window, share)  # the share of rows, Dream's too (plan_drafts keeps layouts in it)
    assert widths[186 // window:] == [window] * (64 - 186 // window)  # the plain window from there on
    plain = DecodeConfig(block_length=32)
    assert {step_width(plain, shift, b) for b in (1, 7, 64)} == {window}


def test_plans_fit_the_next_step(monkeypatch):
    """The sampler plans with the share of this step's batch: every plan is laid out in the width
    the scheduler gives the next step, at any batch, and its drafts' rows fit it (a plan whose
    drafts would not fit loses them: none may lose them for that reason)."""
    from vllm_odb.engine.requests import JumpPlan
    from vllm_odb.policies.step import plan_branches

    cfg = DecodeConfig(jump=True, block_length=16, ridge_rows=96, threshold=1.0)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2, 3, 5, 8):
        block = torch.randint(0, 50, (batch, 16), generator=g)
        block[:, 4:] = 99  # masked
        x0 = torch.randint(0, 50, (batch, 16), generator=g)
        conf = torch.rand(batch, 16, generator=g)
        width = step_width(cfg, 0, batch)
        plans = JumpPlan.plan_many(block, block[:, :0], x0, conf, 99, cfg, batch, width)
        free = plan_branches(block, block[:, :0], x0, conf, block == 99, cfg, batch)  # rows as they come
        for i, p in enumerate(plans):
            assert int(free.layout.num_rows[i]) <= width
            assert p is None or (p.num_rows == width and 16 + int(p.drafts) == int(free.layout.num_rows[i]))
        assert batch > 96 // 32 or any(p is not None and int(p.drafts) for p in plans)  # drafts while there is room


@pytest.fixture
def jump_scheduler(monkeypatch):
    """``make(cls, num_blocks)``: vLLM's scheduler class ``cls`` (CPU) with the plugin's patches, on
    the tiny LLaDA jump-share engine's config; and that engine's ``DecodeConfig``."""
    pytest.importorskip("vllm")
    import vllm.plugins
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm_plugin_common import _cpu_shims, _create

    from vllm_odb.engine import kv_release

    _cpu_shims(monkeypatch)
    monkeypatch.setattr(kv_release, "_listening", kv_release._listening)  # the patch listens: undone after
    vllm.plugins.load_general_plugins()
    config = _create("llada", speculative_config={"method": "odb"})
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)

    def make(cls, num_blocks: int):
        kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        config.cache_config.num_gpu_blocks = num_blocks
        return cls(config, kv, StructuredOutputManager(config), block_size=16)

    return make, DecodeConfig(**config.model_config.hf_config.odb_engine)


def test_vllms_scheduler_gives_each_request_its_share(jump_scheduler):
    """vLLM's AsyncScheduler (CPU) with the patch: after a step of B requests, each running request
    is scheduled ``step_width(B)`` canvas slots (the full canvas alone, the window at large B)."""
    from vllm import SamplingParams
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    make, cfg = jump_scheduler
    for batch in (1, 2, 8, 20):
        sched = make(AsyncScheduler, 2048)
        assert sched.dynamic_sd_lookup[batch] == step_width(cfg, 0, batch)
        ids = [str(i) for i in range(batch)]
        for rid in ids:
            sched.add_request(Request(rid, list(range(20)), SamplingParams(max_tokens=64, temperature=0.0), None))
        prefill = sched.schedule()
        assert set(prefill.num_scheduled_tokens.values()) == {20}
        sched.update_from_output(prefill, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                                            sampled_token_ids=[[] for _ in ids]))
        step = sched.schedule()
        assert set(step.num_scheduled_tokens.values()) == {step_width(cfg, 0, batch)}, batch
        assert {len(v) for v in step.scheduled_spec_decode_tokens.values()} == {step_width(cfg, 0, batch)}


def test_the_model_state_lays_out_rows_of_any_step_width(monkeypatch):
    """``ODBModelState._branch_rows`` with a step narrower than the canvas: each decode row's
    scheduled slots hold its base window (written to the cache), its plan's draft rows at their
    layout offsets and padding at the window start (neither written); a row cut below what it lays
    out is no decode row."""
    import types

    import numpy as np

    from vllm_odb.engine import model_state as ms
    from vllm_odb.engine.requests import JumpPlan, RequestTable

    monkeypatch.setattr(ms, "async_copy_to_gpu", lambda x, device=None: torch.as_tensor(np.asarray(x)).clone())
    cfg = DecodeConfig(jump=True, block_length=16, ridge_rows=96, threshold=1.0, gen_length=64)
    table = RequestTable(3, 256, cfg, 0, 99, 98, [(98,)], "cpu")
    sp = types.SimpleNamespace(temperature=0.0, max_tokens=64, extra_args=None, stop=None)
    for slot in range(3):
        table.add(slot, f"r{slot}", list(range(10 + slot)), None, sp)
    block = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    block[:, 4:] = 99
    k = step_width(cfg, 0, 3)  # the step's slots: 32 each; row 2 cut short to 10
    plan = JumpPlan.plan_many(block, block[:, :0], torch.randint(0, 50, (1, 16)), torch.rand(1, 16), 99, cfg, 3, k)[0]
    assert plan is not None and plan.num_rows == k and 0 < int(plan.drafts) <= k - 16
    table.get(1).plan = plan
    counts = np.array([k, k, 10])
    state = object.__new__(ms.ODBModelState)
    state.table, state.shift, state.device, state.draft_kernel = table, 0, "cpu", False
    state.paged = ms.PagedCache(kernel_block_size=4)
    state.paged.block_tables = torch.stack([torch.arange(64) + 64 * s for s in range(3)])
    state.seq_lens_buf = torch.zeros(3, dtype=torch.int32)
    wrapper = types.SimpleNamespace(batches=None)
    state.branch_attention = [wrapper]
    total = int(counts.sum())
    batch = types.SimpleNamespace(num_reqs=3, idx_mapping_np=np.arange(3), is_prefilling_np=np.zeros(3, bool),
                                  req_ids=["r0", "r1", "r2"],
                                  num_scheduled_tokens=counts, query_start_loc_np=np.concatenate([[0], np.cumsum(counts)]),
                                  positions=torch.full((total,), -7), seq_lens=torch.zeros(3, dtype=torch.int32))
    slots = torch.full((1, total), -7)
    state._branch_rows(batch, slots)
    for r in range(2):
        q0, first = table.get(r).start, r * k
        want = torch.full((k,), q0)
        want[:16] += torch.arange(16)
        if r == 1:
            want[:plan.num_rows] = q0 + plan.offsets
        assert torch.equal(batch.positions[first:first + k], want)
        written = torch.arange(k) < 16
        pos = want[:16]
        assert torch.equal(slots[0, first:first + 16], (64 * r + pos // 4) * 4 + pos % 4)
        assert (slots[0, first:first + k][~written] == -1).all()
    assert (batch.positions[2 * k:] == -7).all() and (slots[0, 2 * k:] == -7).all()  # cut short: left alone
    assert len(wrapper.batches) == 1 and wrapper.batches[0].rows.shape[0] == 1
    # FULL graphs (VLLM_ODB_JUMP_GRAPHS=full): the kernel's layout goes into the fixed buffers the
    # graphs read, and the wrappers keep the one batch over them (set by prepare_attn)
    from vllm_odb.engine.draft_attention import DraftBuffers

    state.draft_kernel = True
    state.draft_buffers = DraftBuffers(3, 96 - 16, 16, 64, "cpu")
    state.draft_buffers.rows.n_draft.fill_(5)  # the last step's plans
    state.draft_buffers.clear()
    wrapper.batches = ["the graph batch"]
    state._branch_rows(batch, slots)
    p = state.draft_buffers.rows
    assert p.n_draft.tolist() == [int(plan.drafts), 0, 0] and wrapper.batches == ["the graph batch"]
    assert p.q0[0] == table.get(1).start and p.ends[0] == table.get(1).keys
    assert torch.equal(p.block_tables[0], state.paged.block_tables[1].int())
    assert p.rows[0, :plan.num_rows - 16].tolist() == list(range(k + 16, k + plan.num_rows))


def test_the_engine_takes_its_gpus_ridge_point_unless_told(monkeypatch):
    """``ridge_rows`` defaults to the draft budget of a GPU we measured: its ridge point (H200: 178,
    H100: 251), read by name from vLLM's platform, capped at ``DRAFT_BUDGET_ROWS`` (128); an
    explicit knob wins; elsewhere DecodeConfig's default."""
    import types

    pytest.importorskip("vllm")
    import vllm.platforms

    from vllm_odb.engine.knobs import engine_config, gpu_draft_budget

    for name, rows in (("NVIDIA H200", 128), ("NVIDIA H100 80GB HBM3", 128), ("NVIDIA A100-SXM4-80GB", 251),
                       ("NVIDIA GH200 480GB", 251)):
        fake = types.SimpleNamespace(is_cuda=lambda: True, get_device_name=lambda i=0, n=name: n)
        monkeypatch.setattr(vllm.platforms, "current_platform", fake)
        assert engine_config({"odb": {"method": "odb"}}).ridge_rows == rows
        assert engine_config({"odb": {"method": "odb", "ridge_rows": 96}}).ridge_rows == 96
        # a block wider than the GPU's ridge keeps the default (which the block must not exceed)
        assert engine_config({"odb": {"method": "odb", "block_length": 200, "gen_length": 400}}).ridge_rows == 251
        # a block at the budget or wider, but below the GPU's ridge: drafts up to the ridge
        ridge = {"NVIDIA H200": 178, "NVIDIA H100 80GB HBM3": 251}.get(name, 251)
        assert engine_config({"odb": {"method": "odb", "block_length": 160, "gen_length": 320}}).ridge_rows == ridge
        # the speed bench takes the same default through gpu_draft_budget (one rule)
        assert gpu_draft_budget(32) == {"NVIDIA H200": 128, "NVIDIA H100 80GB HBM3": 128}.get(name)
        assert gpu_draft_budget(160) == {"NVIDIA H200": 178, "NVIDIA H100 80GB HBM3": 251}.get(name)
        assert gpu_draft_budget(200) == {"NVIDIA H100 80GB HBM3": 251}.get(name)
    monkeypatch.setattr(vllm.platforms, "current_platform", types.SimpleNamespace(is_cuda=lambda: False))
    assert engine_config({"odb": {}}).ridge_rows == DecodeConfig().ridge_rows
    assert gpu_draft_budget(32) is None


def test_rows_cut_below_their_plan_decode_their_window_and_dummy_rows_are_no_decode_rows():
    """``fit_plans``: a row scheduled its window but fewer slots than its plan (cut short, or the
    batch grew since the plan) loses the plan and decodes its window; below the window it keeps the
    plan and decides nothing. ``decode_rows``: a row whose slot holds another request (vLLM's dummy
    rows) is none."""
    import types

    import numpy as np

    from vllm_odb.engine.requests import JumpPlan, RequestTable, decode_rows, fit_plans

    cfg = DecodeConfig(jump=True, block_length=16, ridge_rows=96, threshold=1.0, gen_length=64)
    table = RequestTable(4, 256, cfg, 0, 99, 98, [(98,)], "cpu")
    sp = types.SimpleNamespace(temperature=0.0, max_tokens=64, extra_args=None, stop=None)
    block = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    block[:, 4:] = 99
    for slot in range(4):
        table.add(slot, f"r{slot}", list(range(10)), None, sp)
        table.get(slot).plan = JumpPlan.plan_many(block, block[:, :0], torch.randint(0, 50, (1, 16)),
                                                  torch.rand(1, 16), 99, cfg, 1, 96)[0]
    rows = table.get(0).plan.num_rows
    assert rows > 16
    counts = np.array([rows, rows - 1, 12, rows])
    batch = types.SimpleNamespace(num_reqs=4, idx_mapping_np=np.arange(4), is_prefilling_np=np.zeros(4, bool),
                                  num_scheduled_tokens=counts, req_ids=["r0", "r1", "r2", "_dummy_"])
    fit_plans(batch, table)
    assert [table.get(s).plan is None for s in range(4)] == [False, True, False, False]
    assert decode_rows(batch, table).tolist() == [0, 1]


def test_rows_of_different_widths_reject_what_they_did_not_emit():
    """vLLM advances a row by its scheduled slots minus the rejected: a decode row that emitted a
    block rejects the rest of its own width (rows of one step may differ: scheduled before and
    after the batch changed size); a row cut short rejects all it was given."""
    import numpy as np

    from vllm_odb.engine.sampler import StepOutput, StepRows

    for nlog in ([40, 40, 40, 9], [40, 16, 40, 9]):
        rows = StepRows(slots=np.arange(4), nlog=np.array(nlog), decode=[0, 1, 2], partial=np.array([3]),
                        prefill=np.array([], dtype=np.int64), failed=[])
        out = StepOutput(4, 40, 16, "cpu")
        out.emit([1], torch.ones(1, 16, dtype=torch.long))
        out.reject(rows)
        assert out.num_rejected.tolist() == [nlog[0], nlog[1] - 16, nlog[2], 9]


def test_a_sync_scheduler_keeps_the_cap(jump_scheduler):
    """vLLM's plain (sync) Scheduler with the patch: its placeholders are the worker's full canvas
    every step, so a jump-share engine runs at most ridge_rows // window requests at once."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_odb.engine.knobs import sync_cap

    make, cfg = jump_scheduler
    assert make(Scheduler, 256).max_num_running_reqs == sync_cap(cfg, 0) == 251 // 16
    assert make(AsyncScheduler, 256).max_num_running_reqs == 64
