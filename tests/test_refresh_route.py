"""The refresh forward's two routes (engine/model_state.py): ``VLLM_ODB_REFRESH`` picks one, the
cache refresh hands the paged route the same sequences the dense one gets, and the paged route lays
them out as vLLM's non-causal attention metadata (checked here with vLLM's builders replaced by
recorders; the GPU parity test runs the route itself: tests/test_gpu_vllm.py)."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_odb.engine import model_state
from vllm_odb.engine.model_state import CacheRefresh, PagedCache, PagedRefresh, refresh_route


@pytest.mark.parametrize("value,route", [(None, "paged"), ("", "paged"), ("dense", "dense"), ("paged", "paged"),
                                         (" Paged ", "paged")])
def test_the_route_comes_from_the_environment(monkeypatch, value, route):
    if value is None:
        monkeypatch.delenv("VLLM_ODB_REFRESH", raising=False)
    else:
        monkeypatch.setenv("VLLM_ODB_REFRESH", value)
    assert refresh_route() == route


def test_an_unknown_route_names_the_variable(monkeypatch):
    monkeypatch.setenv("VLLM_ODB_REFRESH", "flash")
    with pytest.raises(ValueError, match="VLLM_ODB_REFRESH='flash'.*dense, paged"):
        refresh_route()


def _tables():
    return torch.arange(3 * 8, dtype=torch.int32).view(3, 8).flip(1).contiguous()


class _Route:
    """A stand-in paged route that records its inputs."""

    graphed = False

    def __init__(self, ready=True):
        self.ready = ready
        self.calls = []

    def __call__(self, ids, pos, slots, bounds, rows):
        self.calls.append((ids.clone(), pos.clone(), slots.clone(), list(bounds), list(rows)))
        return torch.zeros(ids.shape[0], 4)


def _refresh(route):
    dense = []
    model = types.SimpleNamespace(model=types.SimpleNamespace(
        refresh_forward=lambda ids, pos, attend: dense.append((ids, attend.bounds)) or torch.zeros(ids.shape[0], 4)))
    paged = PagedCache(block_tables=_tables(), kernel_block_size=4)
    return CacheRefresh(model, paged, route), dense


def test_a_graphed_refresh_is_counted_per_request():
    """The cache refresh says whether its route replayed graphs; each refreshed request then counts
    its tokens in ``refresh_graph_tokens`` beside ``refresh_tokens`` (bench speed's refresh_graphed)."""
    route = _Route()
    refresh, _ = _refresh(route)
    refresh.forward(torch.zeros(2, 40, dtype=torch.long), [(0, 1, 7)])
    assert not refresh.graphed
    route.graphed = True
    refresh.forward(torch.zeros(2, 40, dtype=torch.long), [(0, 1, 7)])
    assert refresh.graphed
    refresh.paged_forward = None  # the dense route never replays graphs
    refresh.forward(torch.zeros(2, 40, dtype=torch.long), [(0, 1, 7)])
    assert not refresh.graphed


def test_a_ready_paged_route_gets_the_dense_routes_sequences():
    route = _Route()
    refresh, dense = _refresh(route)
    tokens = torch.arange(2 * 40).view(2, 40)
    # job 0: slot 1 in batch row 2, 6 tokens; job 1: slot 0 in row 0, 5 tokens plus a final token
    # (Streaming's pruned canvas: position id 30, cache slot of position 5)
    hidden, offsets = refresh.forward(tokens, [(1, 2, 6), (0, 0, 5, 30)])
    assert not dense and offsets == [0, 6] and hidden.shape == (12, 4)
    ids, pos, slots, bounds, rows = route.calls[0]
    assert ids.tolist() == tokens[1, :6].tolist() + tokens[0, :5].tolist() + [tokens[0, 30].item()]
    assert pos.tolist() == list(range(6)) + list(range(5)) + [30]
    paged = refresh.paged
    want = torch.cat([paged.slots(2, torch.arange(6)), paged.slots(0, torch.arange(6))])
    assert slots.tolist() == want.tolist()
    assert bounds == [(0, 6), (6, 12)] and rows == [2, 0]


@pytest.mark.parametrize("route", [None, _Route(ready=False)])
def test_without_a_ready_paged_route_the_dense_one_serves(route):
    refresh, dense = _refresh(route)
    refresh.forward(torch.zeros(2, 40, dtype=torch.long), [(0, 1, 7)])
    assert len(dense) == 1 and dense[0][1] == [(0, 7)]
    assert route is None or not route.calls


def test_the_paged_route_lays_the_sequences_out_as_non_causal_metadata(monkeypatch):
    import vllm.forward_context as fc

    seen = {}

    def metadata(**kw):
        seen["meta"] = kw
        return {"layer": "meta"}

    class Context:
        def __init__(self, meta, vllm_config, **kw):
            seen["context"] = (meta, vllm_config, kw)

        def __enter__(self):
            seen["batches_inside"] = [list(w.batches) for w in wrappers]

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(model_state, "build_attn_metadata", metadata)
    monkeypatch.setattr(fc, "set_forward_context", Context)
    calls = []
    model = lambda input_ids, positions: calls.append((input_ids, positions)) or torch.ones(input_ids.shape[0], 4)
    wrappers = [types.SimpleNamespace(batches=["planned"]), types.SimpleNamespace(batches=["planned"])]
    group = types.SimpleNamespace(layer_names=["layer"])
    kv_config = types.SimpleNamespace(kv_cache_groups=[group])
    paged = PagedCache(block_tables=_tables(), kernel_block_size=4)
    route = PagedRefresh(model, "the config", paged, wrappers)
    assert not route.ready
    route.bind("groups", kv_config)
    assert route.ready
    ids = torch.arange(9)
    slots = torch.arange(100, 109)
    hidden = route(ids, torch.arange(9), slots, [(0, 4), (4, 9)], [2, 0])
    assert hidden.shape == (9, 4)
    meta = seen["meta"]
    assert meta["causal"] is False and meta["num_reqs"] == 2 and meta["num_tokens"] == 9
    assert meta["query_start_loc_gpu"].tolist() == meta["query_start_loc_cpu"].tolist() == [0, 4, 9]
    assert meta["query_start_loc_gpu"].dtype == meta["seq_lens"].dtype == torch.int32
    assert meta["seq_lens"].tolist() == [4, 5] and meta["max_query_len"] == meta["max_seq_len"] == 5
    assert meta["block_tables"][0].tolist() == _tables()[[2, 0]].tolist()
    assert meta["slot_mappings"].tolist() == [slots.tolist()] and meta["slot_mappings"].dtype == torch.int64
    assert meta["attn_groups"] == "groups" and meta["kv_cache_config"] is kv_config
    ctx_meta, config, kw = seen["context"]
    assert ctx_meta == {"layer": "meta"} and config == "the config" and kw["num_tokens"] == 9
    assert kw["slot_mapping"]["layer"].tolist() == slots.tolist()
    # the model gets the runner's dtypes; no draft rows during the refresh, the step's restored after
    assert calls[0][0].dtype == torch.int32 and calls[0][1].dtype == torch.int64
    assert seen["batches_inside"] == [[], []] and [w.batches for w in wrappers] == [["planned"], ["planned"]]


def _graphed_config(mode_name="FULL_AND_PIECEWISE", sizes=(8, 16, 32), eager=False, pp=1, partition=False,
                    split_cache_write=True):
    from vllm.config.compilation import CUDAGraphMode

    ops = ["vllm::unified_attention_with_output"] + (["vllm::unified_kv_cache_update"] if split_cache_write else [])
    return types.SimpleNamespace(
        compilation_config=types.SimpleNamespace(cudagraph_mode=getattr(CUDAGraphMode, mode_name),
                                                 cudagraph_capture_sizes=list(sizes), splitting_ops=ops,
                                                 use_inductor_graph_partition=partition),
        model_config=types.SimpleNamespace(enforce_eager=eager),
        parallel_config=types.SimpleNamespace(pipeline_parallel_size=pp))


@pytest.mark.parametrize("mode,eager,pp,want", [("FULL_AND_PIECEWISE", False, 1, [8, 16, 32]),
                                                ("PIECEWISE", False, 1, [8, 16, 32]),
                                                ("FULL", False, 1, []), ("NONE", False, 1, []),
                                                ("FULL_AND_PIECEWISE", True, 1, []),
                                                ("FULL_AND_PIECEWISE", False, 2, [])])
def test_refreshes_replay_the_piecewise_sizes_vllm_captures(mode, eager, pp, want):
    """The sizes of vLLM's PIECEWISE graphs for mixed batches, or none (FULL-only or no graphs,
    enforce_eager, another pipeline rank)."""
    assert model_state.piecewise_sizes(_graphed_config(mode, (32, 8, 16), eager, pp)) == want


@pytest.mark.parametrize("partition,split", [(True, True), (False, False)])
def test_no_graphed_refresh_where_the_cache_write_is_captured(partition, split):
    """With the cache write inside the captured pieces (Inductor graph partition, or splitting ops
    without it) a replay would write through the runner's slot mapping, not the refresh's: eager."""
    assert model_state.piecewise_sizes(_graphed_config(partition=partition, split_cache_write=split)) == []


def test_the_paged_route_replays_piecewise_graphs_from_the_runners_buffers(monkeypatch):
    """Once vLLM has captured its graphs, a refresh of n tokens runs PIECEWISE at the next captured
    size: its ids and positions go into the runner's input buffers (the addresses the captured
    pieces read), padding rows at position 0 write no cache slot (-1), and the hidden states come
    back for the n tokens. Before the capture, or past the largest size, it runs eager."""
    import vllm.forward_context as fc
    from vllm.config.compilation import CUDAGraphMode

    seen = []

    class Context:
        def __init__(self, meta, vllm_config, **kw):
            seen.append(kw)

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(model_state, "build_attn_metadata", lambda **kw: {"layer": "meta"})
    monkeypatch.setattr(fc, "set_forward_context", Context)
    captures = [0]
    monkeypatch.setattr(model_state, "_capture_triggers", lambda: captures[0])
    calls = []
    model = lambda input_ids, positions: calls.append((input_ids, positions)) or torch.ones(input_ids.shape[0], 4)
    kv_config = types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(layer_names=["layer"])])
    paged = PagedCache(block_tables=_tables(), kernel_block_size=4)
    route = PagedRefresh(model, _graphed_config(), paged, [])
    assert route.graph_sizes == []  # read at the first bind, once vLLM has settled its graphs
    ids_buf = torch.full((64,), 7, dtype=torch.int32)
    pos_buf = torch.full((64,), 5, dtype=torch.int64)
    route.bind("groups", kv_config, types.SimpleNamespace(input_ids=ids_buf[:3], positions=pos_buf[:3]))
    ids, pos, slots = torch.arange(9) + 40, torch.arange(9) + 2, torch.arange(100, 109)

    assert route(ids, pos, slots, [(0, 9)], [1]).shape == (9, 4)  # vLLM has not captured yet: eager
    assert seen[-1]["cudagraph_runtime_mode"] == CUDAGraphMode.NONE and seen[-1]["num_tokens"] == 9
    assert not route.graphed
    assert calls[-1][0].data_ptr() != ids_buf.data_ptr()

    captures[0] = 1  # the runner's capture_model ran
    hidden = route(ids, pos, slots, [(0, 9)], [1])
    assert hidden.shape == (9, 4) and route.graphed  # (the refresh_graph_tokens metric counts it)
    kw = seen[-1]
    assert kw["cudagraph_runtime_mode"] == CUDAGraphMode.PIECEWISE and kw["num_tokens"] == 16
    assert kw["batch_descriptor"].num_tokens == 16
    assert kw["slot_mapping"]["layer"].tolist() == slots.tolist() + [-1] * 7
    got_ids, got_pos = calls[-1]
    assert got_ids.data_ptr() == ids_buf.data_ptr() and got_pos.data_ptr() == pos_buf.data_ptr()
    assert got_ids.shape == got_pos.shape == (16,)
    assert ids_buf[:9].tolist() == ids.tolist() and pos_buf[:9].tolist() == pos.tolist()
    assert pos_buf[9:16].tolist() == [0] * 7 and pos_buf[16:].tolist() == [5] * 48

    big = torch.arange(40)
    route(big, big, torch.arange(40), [(0, 40)], [1])  # past the largest size (32): eager
    assert seen[-1]["cudagraph_runtime_mode"] == CUDAGraphMode.NONE and seen[-1]["num_tokens"] == 40
    assert not route.graphed
    assert route(ids[:8], pos[:8], slots[:8], [(0, 8)], [1]).shape == (8, 4)  # exactly a size: no padding
    assert seen[-1]["num_tokens"] == 8 and seen[-1]["slot_mapping"]["layer"].tolist() == slots[:8].tolist()

    # a size vLLM had not captured: it captures one on the spot (whose work does not run); the
    # refresh runs again eagerly, and graphs stay off
    made = [0]
    monkeypatch.setattr(model_state, "_graphs_captured", lambda: made[0])
    model_calls = len(calls)

    def capturing(input_ids, positions):
        made[0] += 1
        calls.append((input_ids, positions))
        return torch.ones(input_ids.shape[0], 4)

    route.model = capturing
    assert route(ids, pos, slots, [(0, 9)], [1]).shape == (9, 4)
    assert len(calls) == model_calls + 2 and not route.graphed and route.graph_sizes == []
    assert [kw["cudagraph_runtime_mode"] for kw in seen[-2:]] == [CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE]
    assert calls[-1][0].tolist() == ids.tolist() and seen[-1]["slot_mapping"]["layer"].tolist() == slots.tolist()


def test_input_buffers_that_are_not_prefixes_turn_the_graphs_off():
    kv_config = types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(layer_names=["layer"])])
    route = PagedRefresh(None, _graphed_config(), PagedCache(), [])
    buf = torch.zeros(64, dtype=torch.int32)
    route.bind("groups", kv_config, types.SimpleNamespace(input_ids=buf[4:9], positions=buf[:5].long()))
    assert route.graph_sizes == [] and route.graph_size(8) is None


def test_the_paged_route_refuses_more_than_one_cache_group_when_asked_for(monkeypatch):
    """Asked for by name, the paged route refuses a cache it does not run; as the default, the dense
    route serves that engine instead."""
    paged = PagedCache(block_tables=_tables(), kernel_block_size=4)
    two = types.SimpleNamespace(kv_cache_groups=[object(), object()])
    monkeypatch.setenv("VLLM_ODB_REFRESH", "paged")
    with pytest.raises(RuntimeError, match="VLLM_ODB_REFRESH=paged runs one KV-cache group; this engine has 2"):
        PagedRefresh(None, None, paged, []).bind("groups", two)
    monkeypatch.delenv("VLLM_ODB_REFRESH")
    route = PagedRefresh(None, None, paged, [])
    route.bind("groups", two)
    assert route.unsupported and not route.ready
    route.bind("groups", types.SimpleNamespace(kv_cache_groups=[object()]))  # never bound later
    assert not route.ready


def test_the_paged_route_keeps_refresh_chunks_within_the_compiled_range(monkeypatch):
    """vLLM compiles its forward for at most the runner's token budget: on the paged route a larger
    VLLM_ODB_REFRESH_TOKENS (a debugging override the dense route honours) is cut to it."""
    from engine_stubs import Engine

    from vllm_odb.engine.sampler import ODBSampler
    from vllm_odb.policies import DecodeConfig

    monkeypatch.setenv("VLLM_ODB_REFRESH_TOKENS", "100000")
    eng = Engine(DecodeConfig(gen_length=32, block_length=16), max_num_tokens=4096)
    assert eng.sampler.refresh_budget == 100000  # the dense route
    base = types.SimpleNamespace(sampling_states=None, req_states=eng.sampler.req_states)
    paged = ODBSampler(eng.table, CacheRefresh(eng.sampler.cache.model, eng.paged, _Route()), base, 4096)
    assert paged.refresh_budget == 4096
