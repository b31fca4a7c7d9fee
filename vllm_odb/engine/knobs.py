"""Decoding knobs on the vLLM engine: engine defaults and per-request overrides.

Engine defaults come from ``--additional-config '{"odb": {...}}'`` (``LLM(additional_config=...)``);
a request overrides them through ``SamplingParams.extra_args`` (offline) or ``vllm_xargs`` (HTTP).
Both end as one ``DecodeConfig`` (policies/config.py), so the knob names, defaults and error
messages are the reference loop's. The few engine rules on top:

- ``block_length`` fixes vLLM's canvas (``diffusion_config.canvas_length``), so it is an engine
  knob: a request may repeat it, never change it.
- ``gen_length`` defaults to ``max_tokens`` rounded up to whole blocks (the canvas a request asks
  for), or the engine default when the request leaves ``max_tokens`` unset.
- ``temperature`` is vLLM's own ``SamplingParams.temperature`` (0 = greedy), not an extra arg.
- The engine runs the dual cache with the threshold, factor or adaptive (APD) rule, with or without
  Streaming-dLLM's dynamic threshold and suffix pruning (Fast-dLLM, ODB, Streaming on the dual cache
  and Dynamic-dLLM's APD modes); the fixed-quota and uncached modes, the prefix cache and DCU stay
  in the reference engine.
- Jump-share is an engine property too: its draft rows need a wider canvas (models/hook.py), so
  a request may turn ``jump`` off on a jump-share engine, never on elsewhere.
- A knob a request sets that its resolved config ignores (``factor`` under rule 'threshold',
  ``ridge_rows`` without jump) is refused by name (``DecodeConfig.check_knobs_act``). The engine
  section is defaults for every request, which may pick another rule: it is not checked so.

Pure Python: imported by the front end (request validation), the scheduler patch and the worker.
"""

from __future__ import annotations

import math
import re

from vllm_odb.engine import faults
from vllm_odb.policies.config import METHODS, DecodeConfig

ENGINE_SECTION = "odb"  # --additional-config '{"odb": {...}}'
ENGINE_RULES = ("threshold", "factor", "adaptive")
ENGINE_CACHES = ("dual",)
REQUEST_ONLY_NOT_KNOBS = ("temperature",)
REPLAY_ARG = "replay"  # a benchmark trace (vllm_odb/bench/replay.py), not a decoding knob
# What a method preset sets: a request naming a method drops the engine's values of these.
MODE_KNOBS = ("rule", "cache", "alp", "early_stop", "jump", "suffix_window", "threshold_alpha", "dcu")
# Boolean knobs. The OpenAI server's ``vllm_xargs`` holds strings and numbers only, so a JSON
# true/false arrives as 1/0: a request's 0 or 1 for these is false or true.
BOOL_KNOBS = ("alp", "early_stop", "jump", "dcu")
# A request's extra_args cross to the engine core as msgpack, which has no integers outside
# [-2**63, 2**64): a larger one must be refused here, or it fails later as a server error.
_WIRE_INTS = (-(1 << 63), (1 << 64) - 1)


# Reference-engine-only policies (Dynamic-dLLM's DCU): refused by name on the engine rather than
# silently ignored. DCU is left out of the engine on purpose: `bench dcu-cost` measured it slower
# than the dual cache at real forwards-per-block, with 2-8x the cache memory (BENCHMARKS.md).
# (Streaming-dLLM's suffix pruning and dynamic threshold, and Dynamic's APD, run on both engines.)
REFERENCE_ONLY = {"dcu": lambda v: v}


def _engine_checks(cfg: DecodeConfig, where: str) -> DecodeConfig:
    for name, on in REFERENCE_ONLY.items():
        if on(getattr(cfg, name)):
            raise ValueError(f"{where}{name}={getattr(cfg, name)!r}: not on the vLLM engine (measured slower than "
                             "the dual cache at full size, BENCHMARKS.md); it runs in the reference engine, "
                             "vllm_odb.reference. On the engine, Dynamic-dLLM is method 'dynamic-apd'")
    if cfg.rule not in ENGINE_RULES:
        raise ValueError(f"{where}rule={cfg.rule!r}: the vLLM engine decodes with {list(ENGINE_RULES)} "
                         "(the fixed-quota rule runs in the reference engine)")
    if cfg.cache not in ENGINE_CACHES:
        raise ValueError(f"{where}cache={cfg.cache!r}: the vLLM engine runs cache='dual' "
                         "(other cache modes run in the reference engine)")
    return cfg


def _from_knobs(knobs: dict, where: str) -> DecodeConfig:
    knobs = dict(knobs)
    method = knobs.pop("method", "fast-dllm")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}method={method!r}; choose from {sorted(METHODS)}")
    try:
        return DecodeConfig.from_dict({**METHODS[method], **knobs})
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


# The ridge point of the GPUs we measured, in query rows (bf16 matmul FLOP/s over copy bytes/s):
# H100 753.5 TFLOP/s / 2999 GB/s = 251 (benchmarks/results/gpu/ridge-h100.json, DecodeConfig's
# default); H200 756-774 TFLOP/s / 4.24 TB/s = ~178 (the project's H200 measurements).
RIDGE_ROWS_BY_GPU = (("H200", 178), ("H100", 251))  # matched as words: a GH200 is neither
# The jump-share engine's default draft budget (``ridge_rows``) on those GPUs: at most this many
# rows, below both ridge points. Rows below the ridge are not free on this engine: ~18 us a draft
# row at batch 1 on the H100 (session 14's profile). Past ~128 rows the drafts add little: on the
# CPU, 128 rows keep 95-96% of 251 rows' tokens per forward (v8 checkpoints, 30 prompts, both
# formats). Measured on the H100 (session 15, LLaDA-8B, gen 1024, BENCHMARKS "Session 15"): odb at
# 128 rows ran 382 tok/s at batch 1 and 874 at batch 8; at 251 rows it ran 334 and 799. The
# ``ridge_rows`` knob overrides it; another GPU keeps DecodeConfig's default.
DRAFT_BUDGET_ROWS = 128


def gpu_ridge_rows() -> int | None:
    """``RIDGE_ROWS_BY_GPU``'s row for this machine's first CUDA GPU (by name, through vLLM's
    platform, which reads it without initialising CUDA), or None (another GPU, or none)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
        name = current_platform.get_device_name(0)
    except Exception:  # no vLLM, no device, no NVML: DecodeConfig's default
        return None
    return next((rows for key, rows in RIDGE_ROWS_BY_GPU if re.search(rf"\b{key}\b", name)), None)


def gpu_draft_budget(block_length: int = DecodeConfig.block_length) -> int | None:
    """The engine's default ``ridge_rows`` on this machine's GPU for blocks of ``block_length``: its
    ridge point capped at ``DRAFT_BUDGET_ROWS``, or the ridge point itself for a block at that cap
    or wider (drafts up to the ridge). None, for DecodeConfig's default: a GPU we have not measured,
    or a block wider than its ridge (no draft fits below it)."""
    ridge = gpu_ridge_rows()
    if ridge is None:
        return None
    rows = min(ridge, DRAFT_BUDGET_ROWS)
    if rows <= block_length:
        rows = ridge
    return rows if rows > block_length else None


def engine_config(additional_config: dict | None) -> DecodeConfig:
    """The engine's default ``DecodeConfig`` from vLLM's ``additional_config`` (``ridge_rows``,
    when not given, is this GPU's: ``gpu_draft_budget``)."""
    section = (additional_config or {}).get(ENGINE_SECTION, {})
    if not isinstance(section, dict):
        raise ValueError(f"additional_config.{ENGINE_SECTION} must be a JSON object, got {section!r}")
    if "ridge_rows" not in section:
        rows = gpu_draft_budget(section.get("block_length", DecodeConfig.block_length))
        if rows is not None:
            section = {**section, "ridge_rows": rows}
    for name in REQUEST_ONLY_NOT_KNOBS:
        if name in section:
            raise ValueError(f"additional_config.{ENGINE_SECTION}.{name}: set temperature per request "
                             "(SamplingParams.temperature)")
    where = f"additional_config.{ENGINE_SECTION}: "
    return _engine_checks(_from_knobs(section, where), where)


def default_gen_length(engine: DecodeConfig, max_tokens: int | None) -> int:
    if max_tokens is None:
        return engine.gen_length
    return max(1, math.ceil(max_tokens / engine.block_length)) * engine.block_length


def request_config(engine: DecodeConfig, extra_args: dict | None, temperature: float = 0.0,
                   max_tokens: int | None = None) -> DecodeConfig:
    """One request's ``DecodeConfig``: the engine defaults, then ``extra_args`` (bad or unknown
    knobs raise ``ValueError`` naming them), then vLLM's temperature."""
    args = dict(extra_args or {})
    where = "extra_args: "
    for name, value in args.items():
        _check_wire(where, name, value)
    if REPLAY_ARG in args:
        request_forcing(args.pop(REPLAY_ARG))
    if faults.ARG in args:  # debug fault injection (engine/faults.py): refused unless enabled
        faults.parse(args.pop(faults.ARG))
    for name in BOOL_KNOBS:
        if type(args.get(name)) is int and args[name] in (0, 1):
            args[name] = bool(args[name])
    for name in REQUEST_ONLY_NOT_KNOBS:
        if name in args:
            raise ValueError(f"{where}{name} is not an extra arg; use SamplingParams.temperature")
    if "block_length" in args and args["block_length"] != engine.block_length:
        raise ValueError(f"{where}block_length={args['block_length']!r}: this engine's canvas is "
                         f"block_length={engine.block_length} (set it for the engine with "
                         f"--additional-config '{{\"{ENGINE_SECTION}\": {{\"block_length\": N}}}}')")
    base = {k: v for k, v in _public(engine).items() if k not in ("gen_length", "temperature")}
    if "method" in args:  # a preset replaces the engine's mode knobs; the others stay
        base = {k: v for k, v in base.items() if k not in MODE_KNOBS}
    knobs = {**base, **args}
    knobs.setdefault("gen_length", default_gen_length(engine, max_tokens))
    if temperature is not None:
        knobs["temperature"] = float(temperature)
    cfg = _engine_checks(_from_knobs(knobs, where), where)
    try:  # a knob the request sets that its config would ignore is refused by name
        cfg.check_knobs_act({k: v for k, v in args.items() if k != "method"}, args.get("method"))
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    if cfg.jump and not engine.jump:
        raise ValueError(f"{where}jump=true needs a jump-share engine (method 'odb' or 'odb-jump', e.g. "
                         "--speculative odb): its canvas holds the draft rows")
    return cfg


def _check_wire(where: str, name: str, value) -> None:
    if isinstance(value, list):
        for v in value:
            _check_wire(where, name, v)
    elif isinstance(value, int) and not isinstance(value, bool) and not _WIRE_INTS[0] <= value <= _WIRE_INTS[1]:
        raise ValueError(f"{where}{name}: an integer out of range")


def request_forcing(value):
    """The request's benchmark trace (``extra_args["replay"]``), validated, as its ``Forcing``
    (policies/forcing.py); ``None`` without one. The benchmarks' module is imported only here, for
    a request that carries a trace."""
    if value is None:
        return None
    from vllm_odb.bench.replay import Replay

    try:
        return Replay.from_dict(value)
    except ValueError as e:
        raise ValueError(f"extra_args: {e}") from None


def _public(cfg: DecodeConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def canvas_width(cfg: DecodeConfig, shift: int) -> int:
    """Query rows vLLM schedules per decode step (``diffusion_config.canvas_length``): the block
    (+ Dream's shift) or, on a jump-share engine, the most rows a request alone can lay out:
    ``ridge_rows`` (``policies.jump.plan_drafts`` keeps every layout within it, Dream's shifted
    ones included; before session 14 Dream's reached ``2 * ridge_rows - window``)."""
    window = cfg.block_length + shift
    if not cfg.jump:
        return window
    return max(window, cfg.ridge_rows)


def step_width(cfg: DecodeConfig, shift: int, batch: int) -> int:
    """Query rows a jump-share engine gives each decode request in the step after a step of
    ``batch`` scheduled requests: its share of the draft budget (``policies.jump.plan_drafts``:
    share = ``ridge_rows // batch``, the most rows its layouts take), at least the window, at most
    ``canvas_width``. Many drafts at batch 1, the plain window from ``ridge_rows // window``
    requests on. vLLM's scheduler takes these as its per-batch-size draft counts
    (patches/scheduler_lookahead.py); the sampler plans each step with the same share
    (engine/sampler.py). A plain engine's step is always the window."""
    window = cfg.block_length + shift
    if not cfg.jump:
        return window
    share = cfg.ridge_rows // max(1, batch)
    return max(window, min(canvas_width(cfg, shift), share))


def sync_cap(cfg: DecodeConfig, shift: int) -> int:
    """Requests a jump-share engine runs at once when every step is its whole canvas (no async
    scheduling: vLLM's placeholders cannot follow the batch): ``ridge_rows // window``, the most
    whose drafts all stay below the ridge point."""
    return max(1, cfg.ridge_rows // (cfg.block_length + shift))


def live_gen_length(cfg: DecodeConfig, prompt_len: int, max_model_len: int, reach: int) -> int:
    """The canvas a request decodes on the engine: ``gen_length``, cut to whole blocks that fit in
    ``max_model_len`` (the last block's query reaches ``reach`` = canvas width - block positions
    past the canvas)."""
    room = (max_model_len - prompt_len - reach) // cfg.block_length * cfg.block_length
    return max(0, min(cfg.gen_length, room))


# VLLM_ODB_JUMP_GRAPHS, for a jump-share engine whose draft rows take the Triton kernel (the kernel's
# inputs in fixed buffers: engine/draft_attention.py ``DraftBuffers``):
# - full (the default): vLLM's FULL_AND_PIECEWISE, as a plain engine runs. Uniform steps replay
#   FULL graphs, one set per step width (``step_width`` of each batch size, with async scheduling;
#   patches/cudagraph_widths.py). Refreshes and mixed steps (a prompt beside decodes) replay
#   PIECEWISE graphs, with attention and the draft kernel launched between the pieces.
# - full-any: FULL graphs of any batch (vLLM's FULL mode), the default of sessions 9-14. Its
#   refreshes launch eagerly, because that mode captures no PIECEWISE graphs: a 496-token refresh
#   took 18.1 ms against 13.8 ms graphed (session 15, H100, batch 1).
# - piecewise: attention outside the graphs, launched from Python every layer.
# An fp32 model (the SDPA route) runs piecewise whatever this says.
JUMP_GRAPHS_ENV = "VLLM_ODB_JUMP_GRAPHS"
JUMP_GRAPHS = ("piecewise", "full", "full-any")


def jump_graphs() -> str:
    """A jump-share engine's CUDA-graph mode from ``VLLM_ODB_JUMP_GRAPHS`` (an unknown value names
    the variable)."""
    import os

    mode = os.environ.get(JUMP_GRAPHS_ENV, "").strip().lower() or "full"
    if mode not in JUMP_GRAPHS:
        raise ValueError(f"{JUMP_GRAPHS_ENV}={mode!r}: give one of {', '.join(JUMP_GRAPHS)}")
    return mode


def jump_capture_tokens(cfg: DecodeConfig, shift: int, max_num_seqs: int) -> int:
    """The largest decode step of a jump-share engine whose canvas follows the batch: the most
    tokens ``batch * step_width`` over every batch size (the CUDA graphs' capture size)."""
    return max(b * step_width(cfg, shift, b) for b in range(1, max_num_seqs + 1))
