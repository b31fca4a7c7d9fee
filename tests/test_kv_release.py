"""KV blocks past an ALP cut go back to the pool (engine/kv_release.py with the scheduler patch),
on vLLM's real KV-cache manager (CPU, no GPU)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm_odb.engine import kv_release  # noqa: E402

BLOCK = 16


@pytest.fixture(autouse=True)
def _listening_undone(monkeypatch):
    """The scheduler wrapper (and ``listen``) mark this process as one whose scheduler takes the
    cut notes; undone after each test, so later tests' workers do not expect runner block tables."""
    monkeypatch.setattr(kv_release, "_listening", kv_release._listening)


def _manager(num_blocks=64):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=512, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                          enable_caching=False)


def _request(rid, prompt_len):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=8), None)


def test_release_tail_frees_blocks_past_the_cut():
    m = _manager()
    req = _request("a", 40)
    free0 = m.block_pool.get_num_free_blocks()
    assert m.allocate_slots(req, 40, num_lookahead_tokens=200) is not None  # prompt + canvas: 240 tokens
    held = free0 - m.block_pool.get_num_free_blocks()
    assert held == 15
    assert kv_release.release_tail(m, "a", 100) == 15 - 7  # keep ceil(100 / 16) = 7 blocks
    assert free0 - m.block_pool.get_num_free_blocks() == 7
    assert len(m.coordinator.single_type_managers[0].req_to_blocks["a"]) == 7
    m.free(req)
    assert m.block_pool.get_num_free_blocks() == free0  # nothing lost, nothing freed twice


def test_release_tail_without_blocks_or_tail_is_a_no_op():
    m = _manager()
    assert kv_release.release_tail(m, "nobody", 10) == 0
    req = _request("b", 20)
    m.allocate_slots(req, 20)
    assert kv_release.release_tail(m, "b", 64) == 0


def test_notes_are_taken_once_and_only_shrink():
    kv_release.note("r", 200)
    kv_release.note("r", 300)  # a later, longer note never grows the cut
    assert kv_release.take("r") == 200
    assert kv_release.take("r") is None
    kv_release.note("s", 50)
    kv_release.forget("s")
    assert kv_release.take("s") is None


def test_scheduler_patch_frees_at_the_next_allocation(monkeypatch):
    """The wrapped allocate_slots (patches/scheduler_lookahead.py): after a noted cut the request's
    blocks past end + reach are freed, and later steps allocate nothing past them again."""
    from vllm_odb.patches import scheduler_lookahead

    m = _manager()
    hf_config = types.SimpleNamespace(canvas_length=17, odb_engine={"block_length": 16})
    # The knob resolution is tested elsewhere; here the canvas is prompt 40 + gen 128.
    monkeypatch.setattr(scheduler_lookahead, "canvas_end", lambda request, hf, max_len: 40 + 128)
    wrapped = scheduler_lookahead.wrap_allocate_slots(m, hf_config, 512)
    req = _request("c", 40)
    free0 = m.block_pool.get_num_free_blocks()
    wrapped(req, 40)
    assert free0 - m.block_pool.get_num_free_blocks() == 11  # ceil(168 / 16)
    req.num_computed_tokens = 40
    kv_release.note("c", 40 + 32)  # ALP: two blocks of canvas left
    wrapped(req, 17)  # a decode step: the block plus Dream's shift
    assert free0 - m.block_pool.get_num_free_blocks() == 5  # ceil((72 + 1) / 16): end + reach
    req.num_computed_tokens = 56
    wrapped(req, 17)  # the last block's step needs no new block
    assert free0 - m.block_pool.get_num_free_blocks() == 5
    # Preempted (every block freed), then readmitted: the full canvas again, as in the worker.
    m.free(req)
    req.num_computed_tokens = 0
    kv_release.note("c", 40 + 16)  # a stale note from before the preemption is ignored
    wrapped(req, 40)
    assert free0 - m.block_pool.get_num_free_blocks() == 11


def test_worker_block_list_follows_the_schedulers_free(monkeypatch):
    """The runner keeps its own copy of each block list and only appends to it: after an ALP cut
    the worker trims its count as the scheduler frees (model_state.PagedCache.release), so the blocks
    allocated later (a finished request's EOS step past its cut) land where the scheduler has
    them, never after stale entries that point at freed blocks."""
    import numpy as np

    from vllm_odb.engine.model_state import PagedCache
    from vllm_odb.patches import scheduler_lookahead

    m = _manager()
    hf_config = types.SimpleNamespace(canvas_length=17, odb_engine={"block_length": 16})
    monkeypatch.setattr(scheduler_lookahead, "canvas_end", lambda request, hf, max_len: 40 + 128)
    wrapped = scheduler_lookahead.wrap_allocate_slots(m, hf_config, 512)
    bt = types.SimpleNamespace(block_sizes=[BLOCK], blocks_per_kv_block=[1],
                               num_blocks=types.SimpleNamespace(np=np.zeros((1, 4), dtype=np.int32)))
    paged = PagedCache(runner_block_tables=bt)
    worker: list[int] = []

    def step(req, n):  # the scheduler allocates; the runner appends the new ids at its count
        new = wrapped(req, n)
        del worker[int(bt.num_blocks.np[0, 2]):]
        worker.extend(new.get_block_ids()[0])
        bt.num_blocks.np[0, 2] = len(worker)

    def scheduler_ids():
        return [b.block_id for b in m.coordinator.single_type_managers[0].req_to_blocks["d"]]

    req = _request("d", 40)
    step(req, 40)  # the prompt, and slots for the whole canvas
    assert worker == scheduler_ids() and len(worker) == 11
    req.num_computed_tokens = 40
    end = 40 + 32  # ALP: two blocks of canvas left
    # The sampler's ALP cut: noted for the scheduler (which listens: the wrapper above) and the
    # worker's count trimmed to end + reach (Dream's shift: 1) at once.
    paged.release("d", 2, end, 1)
    assert int(bt.num_blocks.np[0, 2]) == 5
    step(req, 17)
    assert worker == scheduler_ids() and len(worker) == 5
    other = _request("x", 100)  # another request takes the freed blocks
    m.allocate_slots(other, 100)
    req.num_computed_tokens = end  # the canvas is done: the EOS step's window runs past the cut
    step(req, 17)
    assert worker == scheduler_ids() and len(worker) == 6
    taken = {b.block_id for b in m.coordinator.single_type_managers[0].req_to_blocks["x"]}
    assert not taken & set(worker)  # no position of the request maps to another request's block


def test_trim_without_the_runner_tables_fails_loudly():
    from vllm_odb.engine.model_state import PagedCache

    kv_release.listen()  # a scheduler in this process would free the blocks: the worker must trim
    with pytest.raises(RuntimeError, match="runner_block_tables"):
        PagedCache().release("e", 0, 10, 1)
    kv_release.forget("e")
