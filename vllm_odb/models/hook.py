"""The engine config hook for LLaDA and Dream (vLLM's ``MODELS_CONFIG_MAP``).

It runs inside ``VllmConfig.__post_init__`` in every process that builds the config, and turns the
engine knobs (``--additional-config '{"odb": {...}}'``) into vLLM settings:

- the canvas: ``diffusion_config.canvas_length = block_length + shift`` (Dream's query window
  starts one position before the block, because Dream predicts token i from position i-1), or on
  a jump-share engine the most rows one request's drafts can lay out (``knobs.canvas_width``:
  ``ridge_rows``; engine/model_state.py), with FULL CUDA graphs of its decode steps (one set per
  step width: patches/cudagraph_widths.py) and PIECEWISE ones for the rest, on the Triton draft
  kernel (PIECEWISE only on the SDPA route: the draft rows' attention runs outside the graphs);
  a step's canvas follows the batch
  (``knobs.step_width``, set in the scheduler by patches/scheduler_lookahead.py), so the engine
  takes as many requests as a plain one (without async scheduling: at most ``ridge_rows // window``);
- bidirectional paged attention: ``use_non_causal`` and, unless the user chose one, FlashAttention
  for bf16/fp16 on Hopper, else the Triton backend (it also runs fp32, the parity checks' dtype);
  on Hopper FlashAttention is pinned to FA3 unless the user names a version (patches/fa3_hopper.py);
  FlashInfer cannot run non-causal decode batches and is refused;
- no prefix caching and no chunked prefill (bidirectional KV depends on later tokens), with a
  token budget that holds a whole prompt;
- CUDA-graph capture sizes that cover ``max_num_seqs`` canvases;
- the server's default ``max_tokens`` (generation config ``max_new_tokens``) = the engine's
  ``gen_length``, so a request that names no length gets the engine's canvas;
- ``hf_config.odb_engine``: the resolved engine ``DecodeConfig``, read by the request validation
  patch (front end), the scheduler patch and the worker;
- a local checkpoint's weights checked against its config.json from the safetensors headers
  (``checkpoint.check_weights``: missing, truncated or mis-sized weights are one line naming the
  file when the engine is configured, not a traceback from the worker's weight loader).
"""

from __future__ import annotations

import logging
import os

from vllm_odb.checkpoint import check_weights
from vllm_odb.engine.knobs import (
    canvas_width,
    engine_config,
    jump_capture_tokens,
    jump_graphs,
    step_width,
    sync_cap,
)

log = logging.getLogger(__name__)

# Each step materializes [requests x canvas, vocab] logits, which vLLM's memory profile does not
# reserve. vLLM's own defaults for max_num_seqs (128 and up) are cut to this; the hook cannot tell
# a default from a value the user typed, so an explicit value >= 128 is cut too (as vLLM does for
# DiffusionGemma); values below 128 are kept.
DEFAULT_MAX_NUM_SEQS = 64
# Refreshes up to this many tokens replay PIECEWISE CUDA graphs (a plain engine captures them at
# least this far): launched eagerly, an 8B refresh's kernels cost the host ~19 ms on an H100, which
# is the GPU's time for ~900 tokens (session 13's profile of ALP's cut canvases).
REFRESH_GRAPH_TOKENS = 1024
# Load formats whose weights the hook checks before the engine starts (a hub id is vLLM's to
# fetch and is not checked here; "dummy" loads no weights).
WEIGHT_CHECKED_FORMATS = ("auto", "safetensors")


def _checks_weights(path: str, load_format: str) -> bool:
    """A local directory loaded as safetensors (``auto`` with only PyTorch weight files is vLLM's
    to load: vllm-odb's checks read safetensors headers)."""
    if not os.path.isdir(path) or load_format not in WEIGHT_CHECKED_FORMATS:
        return False
    names = os.listdir(path)
    torch_only = any(n.endswith((".bin", ".pt")) for n in names) and not any(n.endswith(".safetensors") for n in names)
    return load_format == "safetensors" or not torch_only


def default_attention_backend(dtype, cache_dtype: str, capability: tuple[int, int] | None,
                              flash_attn: bool) -> str:
    """The attention backend a user who names none gets: vLLM's FlashAttention 3 (pinned by the hook;
    patches/fa3_hopper.py keeps the pin from vLLM's FA4 upgrade) for bf16/fp16 weights and KV cache
    on Hopper (SM90), where it was measured: on the H200 it took the plain decode step from 2.1x to
    1.5x the weight floor and a refresh's attention from 19 ms to 3 ms (BENCHMARKS.md, session 10).
    Elsewhere the Triton backend: other GPUs run FA2 (whose CUDA graphs vLLM limits to uniform
    batches, which jump-share's steps are not) or FA4, neither measured here; and fp32, the dtype of
    the token-parity checks against the reference, has no FlashAttention kernels."""
    import torch

    half = dtype in (torch.bfloat16, torch.float16)
    cache_half = cache_dtype in ("auto", "bfloat16", "float16")
    if half and cache_half and flash_attn and capability is not None and capability[0] == 9:
        return "FLASH_ATTN"
    return "TRITON_ATTN"


def _cuda_capability() -> tuple[int, int] | None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    cap = current_platform.get_device_capability()
    return None if cap is None else (cap.major, cap.minor)


def _flash_attn_available() -> bool:
    """vLLM's own FlashAttention build imports and runs FA3 here."""
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return False
    return is_fa_version_supported(3)


def _fa4_available() -> bool:
    """FA4's interface imports, and with it its CuTe DSL (``cutlass``) and ``quack``: vLLM reports FA4
    supported whenever the interface file exists, then fails at the first forward."""
    try:
        import vllm.vllm_flash_attn.cute.interface  # noqa: F401
    except Exception:  # ImportError, or a DSL that fails while loading its CUDA bindings
        return False
    return True


def verify_and_update(vllm_config) -> None:
    from vllm.config.diffusion import DiffusionConfig
    from vllm.config.scheduler import SchedulerConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    cfg = engine_config(vllm_config.additional_config)
    if _checks_weights(model_config.model, vllm_config.load_config.load_format):
        check_weights(model_config.model, hf_config.spec)
    shift = hf_config.spec.logits_shift
    canvas = canvas_width(cfg, shift)

    dc = vllm_config.diffusion_config
    if dc is None:
        vllm_config.diffusion_config = DiffusionConfig(canvas_length=canvas)
    elif dc.canvas_length != canvas:
        raise ValueError(
            f"diffusion_config.canvas_length={dc.canvas_length} does not match block_length="
            f"{cfg.block_length} (+{shift} for this model's shifted logits"
            + (f", widened for jump-share drafts from ridge_rows={cfg.ridge_rows}" if cfg.jump else "")
            + f" = {canvas}); set the block with --additional-config '{{\"odb\": {{\"block_length\": N}}}}' "
            "and leave --diffusion-config out")
    hf_config.canvas_length = canvas
    hf_config.odb_engine = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}

    attention = vllm_config.attention_config
    if attention.backend == AttentionBackendEnum.FLASHINFER:
        raise ValueError("attention_backend=FLASHINFER cannot run LLaDA/Dream's bidirectional decode "
                         "steps; use FLASH_ATTN (the default for bf16/fp16 on Hopper) or TRITON_ATTN")
    attention.use_non_causal = True
    capability = _cuda_capability()
    if attention.backend is None:
        attention.backend = AttentionBackendEnum[default_attention_backend(
            model_config.dtype, vllm_config.cache_config.cache_dtype, capability, _flash_attn_available())]
        log.info("vllm-odb: attention backend %s (choose another with --attention-backend)",
                 attention.backend.name)
    if attention.backend == AttentionBackendEnum.FLASH_ATTN and attention.flash_attn_version == 4 \
            and not _fa4_available():
        # vLLM takes the pin and fails at the first forward, inside the engine, on the missing module
        raise ValueError("attention_config.flash_attn_version=4 needs FlashAttention 4's CuTe DSL (the "
                         "nvidia-cutlass-dsl package, which vLLM 0.26 requires), and it does not import here: "
                         "install it, or leave flash_attn_version out (FlashAttention 3 on Hopper)")
    if attention.backend == AttentionBackendEnum.FLASH_ATTN and attention.flash_attn_version is None \
            and capability is not None and capability[0] == 9 and _flash_attn_available():
        # FA3 on Hopper: vLLM would upgrade a diffusion model to FA4 for DiffusionGemma's per-sequence
        # causal mask, which ours do not use; patches/fa3_hopper.py makes vLLM keep this pin.
        attention.flash_attn_version = 3

    if vllm_config.cache_config.enable_prefix_caching:
        log.info("vllm-odb: prefix caching is off for diffusion LMs (bidirectional KV)")
        vllm_config.cache_config.enable_prefix_caching = False

    sc = vllm_config.scheduler_config
    sc.enable_chunked_prefill = False
    if sc.max_num_seqs >= SchedulerConfig.DEFAULT_MAX_NUM_SEQS:
        sc.max_num_seqs = DEFAULT_MAX_NUM_SEQS
    step_tokens = sc.max_num_seqs * canvas  # every running request's whole canvas
    if cfg.jump:
        if sc.async_scheduling is False:
            # Without async scheduling vLLM's placeholders cannot follow the batch: every request
            # carries the wide canvas every step, and past ridge_rows // window requests the shared
            # draft budget holds no draft, so such an engine serves at most that many.
            most = sync_cap(cfg, shift)
            if sc.max_num_seqs > most:
                log.info("vllm-odb: jump-share engine without async scheduling: max_num_seqs %d -> %d "
                         "(ridge_rows // window; drafts need room below the ridge point)", sc.max_num_seqs, most)
                sc.max_num_seqs = most
            step_tokens = sc.max_num_seqs * canvas
        else:
            # The canvas follows the batch (knobs.step_width, through the scheduler patch): at most
            # every request's share, plus one step of a batch that grew since its widths were set.
            # Should vLLM turn async scheduling off after this hook (async_scheduling None: e.g. an
            # executor without it), the scheduler patch caps the requests at ridge_rows // window,
            # each with the whole canvas: the budget holds that too.
            most = sync_cap(cfg, shift)
            step_tokens = max(max(b * step_width(cfg, shift, b) for b in range(1, sc.max_num_seqs + 1))
                              + sc.max_num_seqs * (cfg.block_length + shift) + canvas,
                              min(most, sc.max_num_seqs) * canvas)
    # A step must hold a whole prompt, and every running request's canvas.
    sc.max_num_batched_tokens = max(sc.max_num_batched_tokens, model_config.max_model_len, step_tokens)

    cc = vllm_config.compilation_config
    if cfg.jump:
        # Draft rows take an attention side path (engine/model_state.py BranchAttention): outside
        # CUDA graphs (piecewise, or the SDPA route of an fp32 model), or on the Triton kernel
        # captured with the rest of the step. By default (VLLM_ODB_JUMP_GRAPHS=full) that is vLLM's
        # FULL_AND_PIECEWISE, as a plain engine runs: uniform decode steps replay FULL graphs, one
        # set per step width (patches/cudagraph_widths.py: a step's canvas follows the batch), and
        # refreshes replay the PIECEWISE ones (PagedRefresh). full-any: FULL graphs of any batch.
        from vllm.config.compilation import CUDAGraphMode

        from vllm_odb.engine.draft_attention import kernel_selected

        route = jump_graphs()
        full = route != "piecewise" and kernel_selected("cuda", model_config.dtype)
        if cc.cudagraph_mode is None or cc.cudagraph_mode.has_full_cudagraphs():
            mode = (CUDAGraphMode.PIECEWISE if not full else CUDAGraphMode.FULL if route == "full-any"
                    else CUDAGraphMode.FULL_AND_PIECEWISE)
            log.info("vllm-odb: jump-share %s; cudagraph_mode=%s",
                     "runs attention outside CUDA graphs" if not full else "captures its steps whole"
                     if route == "full-any" else "captures its decode steps whole, one set per width", mode.name)
            cc.cudagraph_mode = mode
        if full and cc.max_cudagraph_capture_size is None:
            # A step past the largest capture runs eager. Without async scheduling every request
            # carries the whole canvas. FULL_AND_PIECEWISE: refreshes up to REFRESH_GRAPH_TOKENS too.
            widest = (jump_capture_tokens(cfg, shift, sc.max_num_seqs) if sc.async_scheduling is not False
                      else min(sync_cap(cfg, shift), sc.max_num_seqs) * canvas)
            if route == "full":
                widest = max(widest, min(REFRESH_GRAPH_TOKENS, sc.max_num_batched_tokens))
            cc.max_cudagraph_capture_size = -(-widest // 16) * 16  # vLLM's capture sizes step by 16 past 256
    elif cc.max_cudagraph_capture_size is None and cc.cudagraph_capture_sizes is None:
        # Every decode step of the batch; and the refreshes up to REFRESH_GRAPH_TOKENS replay the
        # PIECEWISE graphs of these sizes (engine/model_state.py PagedRefresh): smaller ones are
        # host-bound when launched eagerly.
        cc.max_cudagraph_capture_size = max(sc.max_num_seqs * canvas,
                                            min(REFRESH_GRAPH_TOKENS, sc.max_num_batched_tokens))

    overrides = model_config.override_generation_config
    if "max_new_tokens" not in overrides:
        overrides["max_new_tokens"] = cfg.gen_length


class ODBConfigHook:
    """``VerifyAndUpdateConfig`` for ``LLaDAModelLM`` and ``DreamModel`` (duck-typed so this module
    imports without vLLM's model package)."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        verify_and_update(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
