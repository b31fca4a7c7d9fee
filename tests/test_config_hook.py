"""LLaDA's and Dream's config classes and the engine config hook (CPU; models/configs.py,
models/hook.py), end to end through vLLM's config path on its CPU platform."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("vllm")


from test_checkpoint import dream_7b_config, llada_8b_config  # noqa: E402
from vllm_odb.checkpoint import ModelSpec, read_config  # noqa: E402
from vllm_odb.models.configs import DreamConfig, LLaDAConfig  # noqa: E402
from vllm_plugin_common import (  # noqa: E402,F401
    CONFIG_CLASS,
    SHIFT,
    TINY,
    _cpu_shims,
    _create,
    _engine,
    cpu_vllm,
    plugins_loaded,
)


# ---------------------------------------------------------------------------------------------
# Config classes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kv_heads", [("llada", 4), ("dream", 2)])
def test_tiny_config_standard_names(fmt, kv_heads):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    got = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers,
           cfg.intermediate_size, cfg.vocab_size, cfg.head_dim)
    vocab = json.loads((TINY[fmt] / "config.json").read_text())["vocab_size"]  # 128 (basic suite) or 2048 (worked)
    assert got == (256, 4, kv_heads, 8, 768, vocab, 64)


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_tiny_config_default_canvas_length(fmt):
    assert CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt])).canvas_length == 32 + SHIFT[fmt]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_tiny_config_spec_matches_checkpoint_parser(fmt):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    assert cfg.spec == ModelSpec.from_config(read_config(str(TINY[fmt])))


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_config_round_trips_through_to_dict(fmt):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    cfg.canvas_length = 17
    again = CONFIG_CLASS[fmt].from_dict(cfg.to_dict())
    assert (again.spec, again.canvas_length) == (cfg.spec, 17)


@pytest.mark.parametrize("cls", [LLaDAConfig, DreamConfig])
def test_bare_config_constructs(cls):
    cls()


def test_llada_8b_config_sizes():
    cfg = LLaDAConfig.from_dict(llada_8b_config())
    got = (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.mask_token_id, cfg.canvas_length)
    assert got == (126464, 32, 4096, 32, 32, 128, 12288, 126336, 32)
    assert cfg.spec == ModelSpec.from_config(llada_8b_config())


def test_dream_7b_config_sizes():
    cfg = DreamConfig.from_dict(dream_7b_config())
    got = (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.mask_token_id, cfg.canvas_length)
    assert got == (152064, 28, 3584, 28, 4, 128, 18944, 151666, 33)
    assert cfg.spec == ModelSpec.from_config(dream_7b_config())

@pytest.fixture(scope="module", params=["llada", "dream"])
def engine_vc(request):
    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        return request.param, _create(request.param)

# ---------------------------------------------------------------------------------------------
# The engine config hook, end to end on vLLM's CPU platform
# ---------------------------------------------------------------------------------------------


def test_hook_canvas_length(engine_vc):
    fmt, vc = engine_vc
    assert vc.diffusion_config.canvas_length == 16 + SHIFT[fmt]


def test_hook_speculative_tokens_are_the_canvas(engine_vc):
    _, vc = engine_vc
    assert vc.num_speculative_tokens == vc.diffusion_config.canvas_length


def test_hook_hf_config_canvas_length(engine_vc):
    fmt, vc = engine_vc
    assert isinstance(vc.model_config.hf_config, CONFIG_CLASS[fmt])
    assert vc.model_config.hf_config.canvas_length == 16 + SHIFT[fmt]


def test_hook_attention(engine_vc):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, vc = engine_vc
    assert vc.attention_config.backend == AttentionBackendEnum.TRITON_ATTN
    assert vc.attention_config.use_non_causal


def test_hook_no_flash_attn_pin_off_hopper(engine_vc):
    _, vc = engine_vc
    assert vc.attention_config.flash_attn_version is None


@pytest.mark.parametrize("dtype, cache, cap, fa, want", [
    ("bfloat16", "auto", (9, 0), True, "FLASH_ATTN"),
    ("float16", "bfloat16", (9, 0), True, "FLASH_ATTN"),
    ("float32", "auto", (9, 0), True, "TRITON_ATTN"),      # no fp32 FlashAttention: the parity dtype
    ("bfloat16", "fp8", (9, 0), True, "TRITON_ATTN"),      # a quantized cache: not measured
    ("bfloat16", "auto", (8, 0), True, "TRITON_ATTN"),     # FA2: uniform-batch graphs only
    ("bfloat16", "auto", (10, 0), True, "TRITON_ATTN"),    # FA4: not measured
    ("bfloat16", "auto", (9, 0), False, "TRITON_ATTN"),    # FlashAttention does not import
    ("bfloat16", "auto", None, True, "TRITON_ATTN"),       # not CUDA
])
def test_default_attention_backend(dtype, cache, cap, fa, want):
    import torch

    from vllm_odb.models.hook import default_attention_backend

    assert default_attention_backend(getattr(torch, dtype), cache, cap, fa) == want


def _hopper(mp, fa=True):
    import vllm_odb.models.hook as hook

    mp.setattr(hook, "_cuda_capability", lambda: (9, 0))
    mp.setattr(hook, "_flash_attn_available", lambda: fa)


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_hook_flash_attn_pinned_to_fa3_on_hopper(fmt):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import vllm_odb.models.hook as hook

    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        _hopper(mp)
        mp.setattr(hook, "_fa4_available", lambda: True)  # whatever this machine has installed
        vc = _create(fmt, dtype="bfloat16")
        fp32 = _create(fmt)
        asked4 = _create(fmt, dtype="bfloat16", attention_config={"flash_attn_version": 4})
        triton = _create(fmt, dtype="bfloat16", attention_backend="TRITON_ATTN")
    assert (vc.attention_config.backend, vc.attention_config.flash_attn_version) == (AttentionBackendEnum.FLASH_ATTN, 3)
    assert (fp32.attention_config.backend, fp32.attention_config.flash_attn_version) == \
        (AttentionBackendEnum.TRITON_ATTN, None)
    assert (asked4.attention_config.backend, asked4.attention_config.flash_attn_version) == \
        (AttentionBackendEnum.FLASH_ATTN, 4)
    assert (triton.attention_config.backend, triton.attention_config.flash_attn_version) == \
        (AttentionBackendEnum.TRITON_ATTN, None)


def test_hook_refuses_fa4_without_its_dsl():
    """A pin at 4 where FA4's CuTe DSL does not import is refused by name at configuration (vLLM
    would take it and fail inside the engine at the first forward)."""
    import vllm_odb.models.hook as hook

    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        _hopper(mp)
        mp.setattr(hook, "_fa4_available", lambda: False)
        with pytest.raises(ValueError, match="flash_attn_version=4 needs"):
            _create("llada", dtype="bfloat16", attention_config={"flash_attn_version": 4})
        _create("llada", dtype="bfloat16")  # the default pins 3: no DSL needed


@pytest.mark.parametrize("pinned, head, other_model, want", [
    (3, 128, False, 3),     # our model, the hook's pin: FA3 kept
    (4, 128, False, 4),     # the user asked for FA4
    (None, 128, False, 4),  # no pin: vLLM's answer
    (3, 512, False, 4),     # FA3 cannot run the head size: vLLM's upgrade stands
    (3, 128, True, 4),      # another model: vLLM's answer
])
def test_fa3_patch_keeps_the_pin(pinned, head, other_model, want):
    from vllm.config import set_current_vllm_config
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import fa_utils

    from vllm_odb.patches import fa3_hopper

    calls = []

    def vllm_answer(requires_alibi=False, head_size=None, head_size_v=None, has_sinks=False):
        calls.append(head_size)
        return 4

    patched = fa3_hopper.wrap(vllm_answer)
    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        vc = _create("llada", attention_config={"flash_attn_version": pinned} if pinned else {})
        if other_model:
            mp.setattr(vc.model_config.hf_config, "odb_engine", None)
        import vllm.platforms as platforms

        mp.setattr(platforms.current_platform, "get_device_capability", lambda *a, **k: DeviceCapability(9, 0))
        mp.setattr(fa_utils, "is_fa_version_supported", lambda v: True)
        with set_current_vllm_config(vc):
            got = patched(head_size=head)
        assert patched() == 4  # no current config (an import-time call): vLLM's answer
    assert got == want and calls[0] == head


def test_fa3_patch_installs_where_flash_attn_is_bound():
    """``apply`` wraps ``fa_utils.get_flash_attn_version`` and the name ``flash_attn.py`` bound at its
    import (on CUDA; elsewhere there is nothing to pin and it leaves vLLM alone)."""
    import vllm.platforms as platforms
    from vllm.v1.attention.backends import fa_utils, flash_attn

    from vllm_odb.patches import fa3_hopper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa_utils, "get_flash_attn_version", fa_utils.get_flash_attn_version)  # restored after
        mp.setattr(flash_attn, "get_flash_attn_version", flash_attn.get_flash_attn_version)
        original = fa_utils.get_flash_attn_version
        mp.setattr(platforms.current_platform, "is_cuda", lambda: False)
        fa3_hopper.apply()
        assert fa_utils.get_flash_attn_version is original
        mp.setattr(platforms.current_platform, "is_cuda", lambda: True)
        fa3_hopper.apply()
        assert getattr(fa_utils.get_flash_attn_version, "_odb_patched", False)
        assert fa_utils.get_flash_attn_version.__wrapped__ is original
        assert flash_attn.get_flash_attn_version is fa_utils.get_flash_attn_version


def test_fa3_patch_asks_the_model_for_a_missing_head_size():
    """Calls without a head size (graph support, AOT schedule) answer as the impl's call with the
    model's head size does: a head over 256 keeps vLLM's FA4."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import fa_utils

    from vllm_odb.patches import fa3_hopper

    patched = fa3_hopper.wrap(lambda **kw: 4)
    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        vc = _create("llada", attention_config={"flash_attn_version": 3})
        import vllm.platforms as platforms

        mp.setattr(platforms.current_platform, "get_device_capability", lambda *a, **k: DeviceCapability(9, 0))
        mp.setattr(fa_utils, "is_fa_version_supported", lambda v: True)
        with set_current_vllm_config(vc):
            assert patched() == 3  # the tiny model's head size, 64
            mp.setattr(vc.model_config, "get_head_size", lambda: 512)
            assert patched() == 4


def test_fa3_patch_leaves_other_answers():
    from vllm_odb.patches import fa3_hopper

    assert fa3_hopper.wrap(lambda **kw: 3)(head_size=128) == 3
    assert fa3_hopper.wrap(lambda **kw: None)() is None
    assert not fa3_hopper.keeps_fa3(4, 10, 3, True)   # Blackwell: FA4 is vLLM's first choice there
    assert not fa3_hopper.keeps_fa3(4, 9, 3, False)   # FA3 not built
    assert not fa3_hopper.keeps_fa3(4, 9, 3, True, 128, 64, has_sinks=True)
    assert fa3_hopper.keeps_fa3(4, 9, 3, True, 128, 128, has_sinks=True)


def test_hook_no_prefix_caching_no_chunked_prefill(engine_vc):
    _, vc = engine_vc
    assert not vc.cache_config.enable_prefix_caching
    assert not vc.scheduler_config.enable_chunked_prefill


def test_hook_token_budget_holds_a_prompt(engine_vc):
    _, vc = engine_vc
    assert vc.scheduler_config.max_num_batched_tokens >= vc.model_config.max_model_len


def test_hook_default_max_num_seqs(engine_vc):
    _, vc = engine_vc
    assert vc.scheduler_config.max_num_seqs == 64


def test_hook_cudagraph_sizes_cover_the_batch(engine_vc):
    _, vc = engine_vc
    assert vc.compilation_config.max_cudagraph_capture_size == 64 * vc.diffusion_config.canvas_length


def test_hook_cudagraph_sizes_cover_small_refreshes_at_a_small_batch(cpu_vllm, monkeypatch):  # noqa: F811
    """A plain engine's graphs reach REFRESH_GRAPH_TOKENS tokens even when its batch's canvases are
    fewer: refreshes that small replay PIECEWISE graphs (engine/model_state.py PagedRefresh)."""
    from vllm_odb.models import hook

    seen = []
    original = hook.verify_and_update
    monkeypatch.setattr(hook, "verify_and_update", lambda vc: original(vc) or seen.append(
        (vc.compilation_config.max_cudagraph_capture_size, vc.scheduler_config.max_num_batched_tokens)))
    vc = _create("llada", max_num_seqs=4)
    size, budget = seen[-1]
    assert 4 * vc.diffusion_config.canvas_length < hook.REFRESH_GRAPH_TOKENS
    assert size == min(hook.REFRESH_GRAPH_TOKENS, budget) and size > 4 * vc.diffusion_config.canvas_length


def test_hook_keeps_capture_sizes_the_user_gave(cpu_vllm, monkeypatch):  # noqa: F811
    """Capture sizes given without a maximum stay the user's: the hook setting a maximum beside them
    would make vLLM refuse the pair as inconsistent."""
    from vllm_odb.models import hook

    seen = []
    original = hook.verify_and_update
    monkeypatch.setattr(hook, "verify_and_update", lambda vc: original(vc) or seen.append(
        (vc.compilation_config.max_cudagraph_capture_size, list(vc.compilation_config.cudagraph_capture_sizes or []))))
    _create("llada", compilation_config={"cudagraph_capture_sizes": [8, 16]})
    assert seen[-1] == (None, [8, 16])


def test_hook_default_max_tokens_is_gen_length(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.override_generation_config["max_new_tokens"] == 64


def test_hook_sets_engine_knobs_on_hf_config(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.hf_config.odb_engine["block_length"] == 16
    assert vc.model_config.hf_config.odb_engine == dataclasses.asdict(_engine())


def test_hook_runner_is_generate(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.runner_type == "generate"
    assert vc.model_config.is_diffusion


def test_hook_bad_knob_names_it(cpu_vllm):  # noqa: F811 (the fixture)
    with pytest.raises(ValueError, match="threshold"):
        _create("llada", additional_config={"odb": {"threshold": 2}})


@pytest.mark.parametrize("fmt, canvas", [("llada", 8), ("dream", 16)])  # Dream's canvas is block + 1
def test_hook_disagreeing_canvas_length_raises(cpu_vllm, fmt, canvas):  # noqa: F811 (the fixture)
    with pytest.raises(ValueError, match="canvas_length"):
        _create(fmt, diffusion_config={"canvas_length": canvas})


def test_hook_agreeing_canvas_length_accepted(cpu_vllm):  # noqa: F811 (the fixture)
    assert _create("dream", diffusion_config={"canvas_length": 17}).diffusion_config.canvas_length == 17


def test_hook_refuses_flashinfer(cpu_vllm):  # noqa: F811 (the fixture)
    with pytest.raises(ValueError, match="FLASHINFER"):
        _create("llada", attention_backend="FLASHINFER")


def test_hook_turns_requested_prefix_caching_off(cpu_vllm):  # noqa: F811 (the fixture)
    assert not _create("llada", enable_prefix_caching=True).cache_config.enable_prefix_caching


def test_hook_keeps_user_max_new_tokens(cpu_vllm):  # noqa: F811 (the fixture)
    vc = _create("llada", override_generation_config={"max_new_tokens": 32})
    assert vc.model_config.override_generation_config["max_new_tokens"] == 32


def test_hook_keeps_a_lower_max_num_seqs(cpu_vllm):  # noqa: F811 (the fixture)
    assert _create("llada", max_num_seqs=100).scheduler_config.max_num_seqs == 100


def test_hook_caps_vllm_default_sized_max_num_seqs(cpu_vllm):  # noqa: F811 (the fixture)
    """Documented (models/hook.py): values >= vLLM's default (128) are cut to 64 (logits memory)."""
    assert _create("llada", max_num_seqs=256).scheduler_config.max_num_seqs == 64

@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_hook_jump_share_engine(cpu_vllm, fmt):  # noqa: F811 (the fixture)
    from vllm.config.compilation import CUDAGraphMode

    from vllm_odb.engine.knobs import step_width
    from vllm_odb.policies import DecodeConfig

    vc = _create(fmt, speculative_config={"method": "odb"})
    window = 16 + SHIFT[fmt]
    assert vc.diffusion_config.canvas_length == 251  # ridge_rows, Dream's too (plan_drafts keeps layouts in it)
    # No concurrency cap: the canvas follows the batch (knobs.step_width through the scheduler),
    # and the token budget holds every request's share plus one step of a batch that just grew.
    sc = vc.scheduler_config
    assert sc.max_num_seqs == 64
    cfg = DecodeConfig(**vc.model_config.hf_config.odb_engine)
    assert sc.max_num_batched_tokens >= max(b * step_width(cfg, SHIFT[fmt], b) for b in range(1, 65)) + 64 * window
    assert not vc.compilation_config.cudagraph_mode.has_full_cudagraphs()
    assert vc.compilation_config.cudagraph_mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE)


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("dtype,route,want", [("bfloat16", "full", "FULL_AND_PIECEWISE"), ("float32", "full", "PIECEWISE"),
                                              ("bfloat16", "full-any", "FULL"), ("float32", "full-any", "PIECEWISE"),
                                              ("bfloat16", "piecewise", "PIECEWISE"), ("bfloat16", None, "FULL_AND_PIECEWISE"),
                                              ("float32", None, "PIECEWISE")])
def test_hook_jump_share_graphs_follow_the_knob_and_the_draft_route(cpu_vllm, monkeypatch, fmt, dtype, route,  # noqa: F811
                                                                   want):
    """Where the draft rows take the Triton kernel (a half-precision model), VLLM_ODB_JUMP_GRAPHS=full
    (the default) runs a jump-share engine as a plain one runs, FULL_AND_PIECEWISE: FULL graphs of
    its decode steps (one set per width: patches/cudagraph_widths.py), PIECEWISE ones for its
    refreshes, captured up to the widest step and at least REFRESH_GRAPH_TOKENS. full-any captures
    FULL graphs of any batch, sized for the widest step. piecewise and an fp32 model (the SDPA route,
    which cannot be captured) keep the attention outside the graphs."""
    pytest.importorskip("triton")
    from vllm.config.compilation import CUDAGraphMode

    from vllm_odb.engine.knobs import jump_capture_tokens
    from vllm_odb.policies import DecodeConfig

    monkeypatch.delenv("VLLM_ODB_DRAFT_ATTENTION", raising=False)
    if route is None:
        monkeypatch.delenv("VLLM_ODB_JUMP_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("VLLM_ODB_JUMP_GRAPHS", route)
    from vllm_odb.models import hook

    seen = []  # the graph settings as the hook leaves them (vLLM's CPU platform turns graphs off later)

    def spy(vllm_config):
        original(vllm_config)
        cc = vllm_config.compilation_config
        seen.append((cc.cudagraph_mode, cc.max_cudagraph_capture_size))

    original = hook.verify_and_update
    monkeypatch.setattr(hook, "verify_and_update", spy)
    vc = _create(fmt, speculative_config={"method": "odb"}, dtype=dtype)
    mode, size = seen[-1]
    assert mode == CUDAGraphMode[want]
    if want != "PIECEWISE":
        cfg = DecodeConfig(**vc.model_config.hf_config.odb_engine)
        most = jump_capture_tokens(cfg, SHIFT[fmt], vc.scheduler_config.max_num_seqs)
        assert most == max(64 * (16 + SHIFT[fmt]), vc.diffusion_config.canvas_length)
        if want == "FULL_AND_PIECEWISE":
            most = max(most, min(hook.REFRESH_GRAPH_TOKENS, vc.scheduler_config.max_num_batched_tokens))
        assert size == -(-most // 16) * 16


def test_hook_full_jump_graphs_without_async_scheduling_cover_the_whole_canvases(cpu_vllm, monkeypatch):  # noqa: F811
    """Without async scheduling every request of a jump-share engine carries the whole canvas: the
    FULL graphs are captured up to the capped batch's canvases."""
    pytest.importorskip("triton")
    from vllm_odb.engine.knobs import sync_cap
    from vllm_odb.models import hook
    from vllm_odb.policies import DecodeConfig

    monkeypatch.setenv("VLLM_ODB_JUMP_GRAPHS", "full")
    monkeypatch.delenv("VLLM_ODB_DRAFT_ATTENTION", raising=False)
    seen = []
    original = hook.verify_and_update
    monkeypatch.setattr(hook, "verify_and_update", lambda vc: original(vc) or seen.append(
        vc.compilation_config.max_cudagraph_capture_size))
    vc = _create("llada", speculative_config={"method": "odb"}, dtype="bfloat16", async_scheduling=False)
    cfg = DecodeConfig(**vc.model_config.hf_config.odb_engine)
    want = sync_cap(cfg, 0) * vc.diffusion_config.canvas_length
    assert seen[-1] == -(-want // 16) * 16 and seen[-1] >= 2 * vc.diffusion_config.canvas_length


def test_an_unknown_jump_graph_mode_names_the_variable(monkeypatch):
    from vllm_odb.engine.knobs import jump_graphs

    monkeypatch.setenv("VLLM_ODB_JUMP_GRAPHS", "breakable")
    with pytest.raises(ValueError, match="VLLM_ODB_JUMP_GRAPHS='breakable': give one of piecewise, full, full-any"):
        jump_graphs()


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_hook_jump_share_engine_without_async_scheduling_keeps_the_cap(cpu_vllm, fmt):  # noqa: F811
    """Without async scheduling vLLM's placeholders are the full canvas every step: at most
    ridge_rows // window requests, each with the whole canvas in the token budget."""
    vc = _create(fmt, speculative_config={"method": "odb"}, async_scheduling=False)
    window = 16 + SHIFT[fmt]
    assert vc.scheduler_config.max_num_seqs == 251 // window
    assert vc.scheduler_config.max_num_batched_tokens >= vc.scheduler_config.max_num_seqs * 251


# ---------------------------------------------------------------------------------------------
# A local checkpoint's weights, checked when the engine is configured
# ---------------------------------------------------------------------------------------------


def _bad_copy(tmp_path, fault):
    import shutil

    from test_errors import CHECKPOINT_FAULTS

    path = shutil.copytree(TINY["llada"], tmp_path / "ckpt")
    make, message = CHECKPOINT_FAULTS[fault]
    make(path)
    return path, message.format(p=path)


@pytest.mark.parametrize("fault", ["truncated weights", "config sizes differ from the weights", "no weights",
                                   "more layers in the config"])
def test_hook_refuses_bad_weights_naming_the_file(cpu_vllm, tmp_path, fault):  # noqa: F811 (the fixture)
    """One line naming the file (inside vLLM's config error), not a traceback from the worker's
    weight loader after the engine started."""
    import re

    path, message = _bad_copy(tmp_path, fault)
    with pytest.raises(ValueError, match=re.escape(message)):
        _create("llada", model=str(path))


def test_hook_leaves_dummy_weights_alone(cpu_vllm, tmp_path):  # noqa: F811 (the fixture)
    path, _ = _bad_copy(tmp_path, "no weights")  # the full-size benchmarks load a config alone
    assert _create("llada", model=str(path), load_format="dummy").model_config.hf_config.canvas_length == 16
