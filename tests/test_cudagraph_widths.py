"""A jump-share engine's CUDA graphs (patches/cudagraph_widths.py, models/hook.py; issue #22): under
FULL_AND_PIECEWISE every decode width the engine steps at (``knobs.step_width`` of each batch size)
has FULL graphs, and vLLM's dispatch finds them. A uniform step of B requests at B's width replays a
FULL graph, a mixed step or refresh a PIECEWISE one. vLLM's own candidate builder, on vLLM's CPU
config path, with the manager's GPU-only parts left out."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm_plugin_common import SHIFT, _create, cpu_vllm  # noqa: E402,F401

CAPTURE_SIZES = [1, 2, 4, 8, *range(16, 257, 16), *range(272, 2049, 16)]  # vLLM's default up to 2048


def _manager(vc, mode, sizes=CAPTURE_SIZES, max_num_reqs=64):
    """vLLM's ``CudaGraphManager`` for ``vc`` with candidates built as its ``__init__`` builds them
    (its process-group and graph-pool parts skipped: they need a GPU)."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    m = object.__new__(CudaGraphManager)
    m.vllm_config = vc
    m.max_num_reqs = max_num_reqs
    m.compilation_config = SimpleNamespace(cudagraph_capture_sizes=list(sizes),
                                           max_cudagraph_capture_size=max(sizes))
    m.cudagraph_mode = mode
    m.decode_query_len = vc.num_speculative_tokens
    m.lora_capture_cases = [0]
    m._lora_dispatch_map, m._max_lora_case = {}, 0
    m.use_breakable_cg = False
    m._candidates, m._capture_descs = {}, {}
    m._graphs_captured = False
    m._init_candidates()
    m._graphs_captured = True
    return m


@pytest.fixture
def patched(cpu_vllm):  # noqa: F811
    from vllm_odb.patches import cudagraph_widths

    cudagraph_widths.apply()


def _jump_vc(fmt, async_scheduling=True):
    """The tiny checkpoint's jump-share engine config (bf16: the draft kernel's graph mode), with
    async scheduling as on a GPU (vLLM's CPU platform turns it off)."""
    vc = _create(fmt, speculative_config={"method": "odb"}, dtype="bfloat16")
    vc.scheduler_config.async_scheduling = async_scheduling
    return vc


def _widths(vc, fmt, most=64):
    from vllm_odb.engine.knobs import step_width
    from vllm_odb.policies import DecodeConfig

    cfg = DecodeConfig(**vc.model_config.hf_config.odb_engine)
    return [step_width(cfg, SHIFT[fmt], b) for b in range(most + 1)]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_every_batch_at_its_width_replays_a_full_graph(patched, fmt):
    from vllm.config.compilation import CUDAGraphMode

    vc = _jump_vc(fmt)
    m = _manager(vc, CUDAGraphMode.FULL_AND_PIECEWISE)
    widths = _widths(vc, fmt)
    assert len(set(widths[1:])) > 2  # the canvas narrows through several widths (ridge 251, window 16)
    for b in range(1, 65):
        w = widths[b]
        for shrunk in range(1, b + 1):  # a batch that shrank since its widths were set, too
            d = m.dispatch(shrunk, shrunk * w, w, 0)
            assert d.cg_mode == CUDAGraphMode.FULL and d.uniform_token_count == w, (b, shrunk, d)
            assert d.num_reqs >= shrunk and d.num_tokens == d.num_reqs * w
    # The wide canvas alone: one graph of one request, not graphs of 2..64 wide requests.
    wide = [d for d in m._capture_descs[CUDAGraphMode.FULL] if d.uniform_token_count == widths[1]]
    assert [d.num_reqs for d in wide] == [1]
    # The window serves batches up to 64: as many graphs as a plain engine captures.
    window = 16 + SHIFT[fmt]
    plain = _manager(_create(fmt, dtype="bfloat16"), CUDAGraphMode.FULL_AND_PIECEWISE)
    assert plain.decode_query_len == window
    assert ({d.num_reqs for d in m._capture_descs[CUDAGraphMode.FULL] if d.uniform_token_count == window}
            == {d.num_reqs for d in plain._capture_descs[CUDAGraphMode.FULL]})


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_refreshes_and_mixed_steps_replay_piecewise_graphs(patched, fmt):
    from vllm.config.compilation import CUDAGraphMode

    vc = _jump_vc(fmt)
    m = _manager(vc, CUDAGraphMode.FULL_AND_PIECEWISE)
    assert [d.num_tokens for d in m._capture_descs[CUDAGraphMode.PIECEWISE]] == sorted(CAPTURE_SIZES, reverse=True)
    for n in (1, 9, 250, 251, 252, 700, 1024, 2048):  # a refresh of n tokens (one request: not uniform)
        d = m.dispatch(1, n, None, 0)
        assert d.cg_mode == CUDAGraphMode.PIECEWISE and d.num_tokens == min(s for s in CAPTURE_SIZES if s >= n)
    d = m.dispatch(3, 100, None, 0)  # a mixed step (a prompt beside decodes)
    assert d.cg_mode == CUDAGraphMode.PIECEWISE and d.num_tokens == 112
    assert m.dispatch(1, 2049, None, 0).cg_mode == CUDAGraphMode.NONE  # past the largest capture: eager


def test_plain_engines_and_other_modes_keep_vllms_candidates(patched):
    """A plain engine (one width), and a jump-share engine under FULL (any batch): the wrapper leaves
    vLLM's table as vLLM builds it."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from vllm_odb.patches import cudagraph_widths

    for vc, mode in ((_create("llada", dtype="bfloat16"), CUDAGraphMode.FULL_AND_PIECEWISE),
                     (_jump_vc("llada"), CUDAGraphMode.FULL)):
        m = _manager(vc, mode)
        assert cudagraph_widths.engine_widths(m) is None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CudaGraphManager, "_init_candidates", CudaGraphManager._init_candidates.__wrapped__)
            vllms = _manager(vc, mode)
        assert m._candidates == vllms._candidates and m._capture_descs == vllms._capture_descs
        assert vc.speculative_config is None  # the stand-in is gone


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_without_async_scheduling_every_batch_keeps_the_whole_canvas_graphs(patched, fmt):
    """Without async scheduling every step of a jump-share engine is the whole canvas (the scheduler
    patch caps the batch instead): the wrapper leaves vLLM's graphs, of that width, for every batch."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from vllm_odb.engine.knobs import sync_cap
    from vllm_odb.patches import cudagraph_widths
    from vllm_odb.policies import DecodeConfig

    vc = _jump_vc(fmt, async_scheduling=False)
    canvas = vc.diffusion_config.canvas_length
    cap = sync_cap(DecodeConfig(**vc.model_config.hf_config.odb_engine), SHIFT[fmt])
    assert cap > 1
    sizes = [*CAPTURE_SIZES, *range(2064, -(-cap * canvas // 16) * 16 + 1, 16)]  # the hook's capture for it
    m = _manager(vc, CUDAGraphMode.FULL_AND_PIECEWISE, sizes)
    assert cudagraph_widths.engine_widths(m) is None
    for b in range(1, cap + 1):
        d = m.dispatch(b, b * canvas, canvas, 0)
        assert d.cg_mode == CUDAGraphMode.FULL and d.uniform_token_count == canvas
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CudaGraphManager, "_init_candidates", CudaGraphManager._init_candidates.__wrapped__)
        vllms = _manager(vc, CUDAGraphMode.FULL_AND_PIECEWISE, sizes)
    assert m._candidates == vllms._candidates


def test_the_stand_in_table_is_removed_when_vllm_raises(patched, monkeypatch):
    from vllm.config.compilation import CUDAGraphMode

    from vllm_odb.patches import cudagraph_widths

    vc = _jump_vc("llada")

    def boom(self):
        assert isinstance(self.vllm_config.speculative_config, cudagraph_widths.WidthTable)
        assert self.vllm_config.num_speculative_tokens == vc.diffusion_config.canvas_length
        raise RuntimeError("boom")

    wrapped = cudagraph_widths.wrap(boom)
    m = object.__new__(type("M", (), {}))
    m.vllm_config, m.cudagraph_mode, m.max_num_reqs = vc, CUDAGraphMode.FULL_AND_PIECEWISE, 64
    with pytest.raises(RuntimeError, match="boom"):
        wrapped(m)
    assert vc.speculative_config is None


def test_kept_graphs_and_the_table_on_a_small_case():
    """Widths 8 (batch 1), 4 (batch 2), 2 (batches 3-4): the kept graphs and the dispatch order."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor as D

    from vllm_odb.patches.cudagraph_widths import dispatch_table, kept_decode_graphs

    full, pw = CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE
    dec = [D(cg_mode=full, num_tokens=w * r, num_reqs=r, uniform_token_count=w) for w in (8, 4, 2) for r in (1, 2, 4)]
    keep = kept_decode_graphs(dec, [0, 8, 4, 2, 2])
    assert sorted((d.uniform_token_count, d.num_reqs) for d in keep) == [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)]
    mixed = [D(cg_mode=pw, num_tokens=n, num_reqs=None) for n in (4, 8, 16)]
    table = dispatch_table(sorted(keep, key=lambda d: -d.num_tokens), mixed)
    row = table[(7, 0)]  # 7 tokens: each width's 8-token graph, then the mixed 8
    assert sorted((d.uniform_token_count, d.num_tokens) for d in row[:-1]) == [(2, 8), (4, 8), (8, 8)]
    assert (row[-1].uniform_token_count, row[-1].num_tokens) == (None, 8)
    assert {(d.uniform_token_count, d.num_tokens) for d in table[(3, 0)]} == {(2, 4), (4, 4), (8, 8), (None, 4)}
    assert [(d.uniform_token_count, d.num_tokens) for d in table[(16, 0)]] == [(None, 16)]
    assert max(n for n, _ in table) == 16
