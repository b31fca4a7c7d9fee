"""``python -m vllm_odb.bench calibrate-fastdllm``: calibrate the reference engine against the official
Fast-dLLM model code (issue #8).

    scripts/stage_fastdllm.sh <Fast-dLLM mirror git dir>        # once: fills .gpu/fastdllm/
    python -m vllm_odb.bench calibrate-fastdllm --fastdllm-dir .gpu/fastdllm \
        [--config 8b|small] [--prompt-len 512 --gen-length 256 --block-length 32] \
        [--iters 20 --warmup 3] [--device cuda --dtype bfloat16] [--order ours,theirs] \
        [--variants] [--profile] [--out calib.json]

The reference engine stands in for the research code in every ratio of the benchmarks, so its
per-forward time must match the research code's. The benchmarks run it with
``attention_impl="research"`` (vllm_odb/bench/research.py: the cache kept as the research code
keeps it); that is "ours" here, and the faster ``"plain"`` layout is timed beside it for the
record. This script times, at batch 1 and with identical shapes and identical (random,
name-seeded) weights:

- refresh forward: the whole sequence (prompt + gen_length tokens), returning the KV cache.
  Ours:  ``model(x, pos, key_mask, return_kv=True)`` (vllm_odb/reference/generate.py, step 0).
  Theirs: ``model(x, use_cache=True)`` (Fast-dLLM llada/generate.py, generate_with_dual_cache).
- block decode forward (dual cache): the block's tokens against the full-sequence cache.
  Ours:  ``model(x[:, s:e], pos[:, s:e], key_mask, past=cache, splice=(s, e))``.
  Theirs: ``model(x[:, s:e], past_key_values=past_key_values, use_cache=True,
  replace_position=replace_position)`` with ``replace_position[:, s:e] = 1``.

Both models are built directly on the device (meta init, ``to_empty``, then a per-tensor seeded
normal init keyed by the internal tensor name, so both get bit-identical weights; two 8B models
in bf16 take ~33 GB). Both are held at once so that their calls can be timed interleaved, round by
round: a bs-1 forward is host-bound and the host's speed drifts over seconds, which timing one
model after the other turned into ±20% swings between runs. Each model's refresh and decode
logits (kept on the CPU) are compared (max abs difference, argmax agreement) to show that the
timed computations are equivalent.

Fast-dLLM's code is NVlabs' (Apache-2.0). It is only read from ``--fastdllm-dir`` (gitignored,
staged by scripts/stage_fastdllm.sh, carried to the GPU machine at run time), never committed.

Notes on fairness:
- Fast-dLLM's ``LLaDAModel.__init__`` flips global SDPA switches (flash on, mem-efficient off).
  Ours runs with the process defaults (as the reference engine does); the switches are saved
  before their model is built, theirs are used only while timing theirs, and both sets are
  recorded in the JSON.
- Their attention kernel call is wrapped in ``torch.compile`` (as in their code), and so is
  ours in the research impl (LLaDA on CUDA); warm-up iterations absorb the compilations. Set
  TORCHDYNAMO_DISABLE=1 only as a fallback if compilation fails on the machine: it turns off
  both (recorded as ``dynamo_disabled``; ``compiled_graphs`` counts the graphs compiled, theirs
  and ours).
- transformers API drift (their code targets 4.4x) is handled by shims applied in THIS process
  before their import (``apply_shims``), listed under ``shims``; none is needed with 5.23.
- Their ``LLaDAModelLM.__init__`` forces CPU init; we build their ``LLaDAModel`` ourselves on the
  meta device and wrap it (``LLaDAModelLM(config, model=...)``): same modules, same forward.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import zlib

import torch

from vllm_odb.bench import research
from vllm_odb.bench.full_size import llada_8b_config
from vllm_odb.checkpoint import ModelSpec, official_to_internal
from vllm_odb.reference.model import DiffusionLM

PKG = "fastdllm_llada_model"  # the name their llada/model package is imported under
SHIMS: list[str] = []  # compatibility shims applied before importing their code (recorded)


# ----------------------------------------------------------------------------- configs


def make_config(name: str) -> dict:
    cfg = llada_8b_config()
    if name == "small":
        cfg.update(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128,
                   vocab_size=128, embedding_size=128, mask_token_id=126, eos_token_id=127,
                   pad_token_id=127)
    elif name != "8b":
        raise ValueError(f"--config {name!r}: expected 8b or small")
    return cfg


def their_config_kwargs(cfg: dict) -> dict:
    """The official LLaDA config.json also sets these (their ModelConfig defaults differ)."""
    c = dict(cfg)
    c.pop("model_type", None)  # a class attribute of LLaDAConfig
    c.setdefault("attention_dropout", 0.0)
    c.setdefault("residual_dropout", 0.0)
    c.setdefault("embedding_dropout", 0.0)
    c.setdefault("flash_attention", False)
    return c


# ----------------------------------------------------------------------------- their code


def apply_shims() -> None:
    """Work around transformers API drift in OUR process (their files stay unmodified)."""
    import transformers

    if not hasattr(transformers, "PretrainedConfig") and hasattr(transformers, "PreTrainedConfig"):
        transformers.PretrainedConfig = transformers.PreTrainedConfig  # renamed in transformers 5
        SHIMS.append("transformers.PretrainedConfig = transformers.PreTrainedConfig")
    import transformers.cache_utils as cu

    if not hasattr(cu, "Cache"):  # only imported by their module, never used
        class Cache:  # noqa: D401
            pass

        cu.Cache = Cache
        SHIMS.append("transformers.cache_utils.Cache placeholder")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "llada" in CONFIG_MAPPING and not getattr(AutoConfig.register, "_calib_shim", False):
        # Their configuration module ends with AutoConfig.register("llada", ...), which raises if
        # this transformers already knows a "llada" model type.
        register = AutoConfig.register

        def register_exist_ok(model_type, config, exist_ok=False):
            return register(model_type, config, exist_ok=True)

        register_exist_ok._calib_shim = True
        AutoConfig.register = register_exist_ok
        SHIMS.append("AutoConfig.register(..., exist_ok=True) ('llada' already registered)")


def import_fastdllm(fastdllm_dir: str):
    """Import their llada/model package (relative imports intact) under a private name."""
    pkg_dir = os.path.join(os.path.abspath(fastdllm_dir), "llada", "model")
    init = os.path.join(pkg_dir, "__init__.py")
    if not os.path.exists(init):
        sys.exit(f"{init} not found: run scripts/stage_fastdllm.sh <Fast-dLLM mirror> first "
                 "(and carry .gpu/fastdllm to the GPU machine)")
    apply_shims()
    spec = importlib.util.spec_from_file_location(PKG, init, submodule_search_locations=[pkg_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f"{PKG}.modeling_llada"), importlib.import_module(f"{PKG}.configuration_llada")


def fastdllm_source(fastdllm_dir: str) -> dict:
    info = {"dir": fastdllm_dir}
    try:
        with open(os.path.join(fastdllm_dir, "SOURCE")) as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    if k.strip() in ("repo", "commit"):
                        info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------- weights


def seeded_init_(model: torch.nn.Module, to_internal, seed: int) -> None:
    """Fill every parameter from a generator seeded by (seed, internal name): two models whose
    names map to the same internal names get bit-identical weights, on any device."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = to_internal(name)
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            if key.endswith("norm.weight"):
                p.normal_(1.0, 0.05, generator=gen)
            elif key.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def build_ours(cfg: dict, device, dtype, seed: int) -> DiffusionLM:
    spec = ModelSpec.from_config(cfg)
    with torch.device("meta"):
        model = DiffusionLM(spec)
    model = model.to(dtype).to_empty(device=device).eval()
    seeded_init_(model, lambda n: n, seed)
    return model


def build_theirs(ml, cl, cfg: dict, device, dtype, seed: int):
    lcfg = cl.LLaDAConfig(**their_config_kwargs(cfg))
    mcfg = ml.create_model_config_from_pretrained_config(lcfg)
    mcfg.init_device = "meta"  # LLaDAModelLM(config) alone would build on the CPU
    inner = ml.LLaDAModel(mcfg, init_params=False)
    model = ml.LLaDAModelLM(lcfg, model=inner)
    model = model.to(dtype).to_empty(device=device).eval()
    ours_names = set(ours_param_names(cfg))
    theirs = {official_to_internal("llada", n) for n, _ in model.named_parameters()}
    if theirs != ours_names:
        raise RuntimeError(f"tensor name mismatch: only theirs {sorted(theirs - ours_names)[:4]}, "
                           f"only ours {sorted(ours_names - theirs)[:4]}")
    seeded_init_(model, lambda n: official_to_internal("llada", n), seed)
    return model


def ours_param_names(cfg: dict) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in DiffusionLM(ModelSpec.from_config(cfg)).named_parameters()]


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_flags() -> dict:
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
             "math": b.math_sdp_enabled()}
    if hasattr(b, "cudnn_sdp_enabled"):
        flags["cudnn"] = b.cudnn_sdp_enabled()
    return flags


def set_sdpa_flags(flags: dict) -> None:
    b = torch.backends.cuda
    b.enable_flash_sdp(flags["flash"])
    b.enable_mem_efficient_sdp(flags["mem_efficient"])
    b.enable_math_sdp(flags["math"])
    if "cudnn" in flags and hasattr(b, "enable_cudnn_sdp"):
        b.enable_cudnn_sdp(flags["cudnn"])


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ----------------------------------------------------------------------------- runs


def make_inputs(cfg: dict, args, device) -> dict:
    """Token ids of a refresh (prompt + all-mask canvas) and of a later decode step's block
    (about half its masks decoded), identical for both models."""
    vocab, mask_id = int(cfg["embedding_size"]), int(cfg["mask_token_id"])
    plen, glen, blen = args.prompt_len, args.gen_length, args.block_length
    gen = torch.Generator().manual_seed(args.seed)

    def rand_ids(n):
        t = torch.randint(0, vocab - 1, (n,), generator=gen)
        return torch.where(t >= mask_id, t + 1, t)  # never the mask id

    x = torch.full((1, plen + glen), mask_id, dtype=torch.long)
    x[0, :plen] = rand_ids(plen)
    s = plen + args.block_index * blen
    e = s + blen
    block = x[:, s:e].clone()
    decided = torch.rand(blen, generator=gen) < 0.5
    block[0, decided] = rand_ids(int(decided.sum()))
    return {"x": x.to(device), "block": block.to(device), "s": s, "e": e}


def profile_fn(fn, device: torch.device, iters: int = 5, top: int = 12) -> dict:
    """Per call: host ops launched, kernels, stream syncs (the host waiting for the GPU), GPU busy
    time, and the host ops with the most self CPU time (where a host-bound forward goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
             or (e.name == "cudaMemcpyAsync" and e.cpu_time_total > 50)]
    table = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return {"calls": iters, "aten_ops_per_call": round(len(ops) / iters, 1),
            "kernels_per_call": round(len(kernels) / iters, 1),
            "host_waits_per_call": round(len(syncs) / iters, 1),
            "gpu_busy_ms_per_call": round(sum(e.device_time for e in kernels) / 1e3 / iters, 3),
            "top_self_cpu_ms_per_call": {a.key: round(a.self_cpu_time_total / 1e3 / iters, 3) for a in table}}


def time_interleaved(calls: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """Time every call of ``calls`` ({name: {kind: fn}}) in rounds: each round times each call
    once, in the dict's order. The machine's host speed drifts over seconds (host-bound forwards
    show it), so interleaving gives every call the same conditions, unlike timing one model's
    calls after the other's."""
    flat = [(name, kind, fn) for name, kinds in calls.items() for kind, fn in kinds.items()]
    for _, _, fn in flat:
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict = {(name, kind): [] for name, kind, _ in flat}
    for _ in range(iters):
        for name, kind, fn in flat:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name, kind].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name, kind].append((time.perf_counter() - t0) * 1e3)
    res: dict = {name: {} for name in calls}
    for (name, kind), xs in samples.items():
        res[name][kind] = {"median_ms": round(statistics.median(xs), 4), "min_ms": round(min(xs), 4),
                           "mean_ms": round(statistics.fmean(xs), 4), "samples_ms": [round(x, 4) for x in xs]}
    return res


def prepare_ours(cfg, args, device, dtype, inp, flags: dict) -> tuple[dict, dict]:
    """The reference model's calls ({variant: {"refresh", "decode"}}) and its logits per impl.
    ``research`` (the calibrated impl the benchmarks run) and ``plain`` always; with --variants,
    the research impl with an eager attention call (LLaDA's research file compiles it, and so
    does ours on CUDA) and plain without the key mask. Each call sets the state it needs (SDPA
    switches, impl, compile switch) first: the calls are timed interleaved with theirs."""
    model = build_ours(cfg, device, dtype, args.seed)
    x, block, s, e = inp["x"], inp["block"], inp["s"], inp["e"]
    key_mask = torch.ones_like(x, dtype=torch.bool)  # bs 1, no padding (as generate() builds it)
    pos = (key_mask.long().cumsum(1) - 1).clamp_min(0)
    variants = [("research", "research", True, key_mask), ("plain", "plain", True, key_mask)]
    if args.variants:
        variants += [("research_eager_attention", "research", False, key_mask),
                     ("plain_no_key_mask", "plain", True, None)]
    calls, out = {}, {}
    for name, impl, compiled, km in variants:
        def setup(impl=impl, compiled=compiled):
            set_sdpa_flags(flags)
            research.set_attention_impl(model, impl)
            research.COMPILE_RESEARCH_ATTENTION = compiled

        setup()
        logits, cache = model(x, pos, km, return_kv=True)
        step = model(block, pos[:, s:e], km, past=cache, splice=(s, e))
        if name in ("research", "plain"):
            out[name] = {"refresh_logits": logits.float().cpu(), "decode_logits": step.float().cpu()}
        del logits, step

        # A research decode writes the block's K/V into its cache in place; every timed call
        # writes the same values, so the cache stays what the first call left (as theirs).
        def refresh(setup=setup, km=km):
            setup()
            return model(x, pos, km, return_kv=True)

        def decode(setup=setup, km=km, cache=cache):
            setup()
            return model(block, pos[:, s:e], km, past=cache, splice=(s, e))

        calls[name] = {"refresh": refresh, "decode": decode}
    return calls, out


def prepare_theirs(ml, cl, cfg, args, device, dtype, inp) -> tuple[dict, dict, dict]:
    """Their calls, their logits and the SDPA switches their model set (used for their calls)."""
    model = build_theirs(ml, cl, cfg, device, dtype, args.seed)  # flips the global SDPA switches
    flags = sdpa_flags()
    x, block, s, e = inp["x"], inp["block"], inp["s"], inp["e"]
    # generate_with_dual_cache: cache init and update, then the block's cached steps.
    output = model(x, use_cache=True)
    past_key_values = output.past_key_values
    replace_position = torch.zeros_like(x, dtype=torch.bool)
    replace_position[:, s:e] = 1
    step = model(block, past_key_values=past_key_values, use_cache=True, replace_position=replace_position).logits
    out = {"refresh_logits": output.logits.float().cpu(), "decode_logits": step.float().cpu()}
    del output, step

    # Their decode writes the block's K/V into past_key_values in place; every timed call
    # writes the same values, so the cache stays what the first call left.
    def refresh():
        set_sdpa_flags(flags)
        return model(x, use_cache=True)

    def decode():
        set_sdpa_flags(flags)
        return model(block, past_key_values=past_key_values, use_cache=True, replace_position=replace_position)

    return {"fastdllm": {"refresh": refresh, "decode": decode}}, out, flags


def _dynamo_graphs() -> int | None:
    """Graphs torch.compile built (only their SDPA wrapper is compiled): evidence it ran compiled."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return None


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "max_abs_logit": float(torch.maximum(a.abs().max(), b.abs().max())),
        "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def _check(args) -> tuple[torch.device, dict]:
    """The device (made current) and the model config, or ValueError naming the bad flag."""
    if args.gen_length % args.block_length or not 0 <= args.block_index < args.gen_length // args.block_length:
        raise ValueError("gen-length must be a multiple of block-length and block-index a block of it")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    cfg = make_config(args.config)
    if args.prompt_len + args.gen_length > cfg["max_sequence_length"]:
        raise ValueError("prompt-len + gen-length exceeds max_sequence_length")
    return device, cfg


def _time_both(args, device: torch.device, cfg: dict):
    """Both models built, their logits kept, their calls timed interleaved (and profiled with
    --profile). Returns the timings per impl, both sides' logits and both SDPA switch sets."""
    dtype = getattr(torch, args.dtype)
    inp = make_inputs(cfg, args, device)
    default_flags = sdpa_flags()  # before their module can flip the global SDPA switches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        ours_calls, ours_out = prepare_ours(cfg, args, device, dtype, inp, default_flags)
        ml, cl = import_fastdllm(args.fastdllm_dir)
        their_calls, theirs_out, their_flags = prepare_theirs(ml, cl, cfg, args, device, dtype, inp)
        calls = {**ours_calls, **their_calls} if args.order == "ours,theirs" else {**their_calls, **ours_calls}
        timed = time_interleaved(calls, device, args.warmup, args.iters)
        if args.profile:
            for name in ("research", "plain", "fastdllm"):
                timed[name]["profile"] = {kind: profile_fn(fn, device) for kind, fn in calls[name].items()}
    research.COMPILE_RESEARCH_ATTENTION = True
    set_sdpa_flags(default_flags)
    return inp, timed, ours_out, theirs_out, default_flags, their_flags


def _result(args, device, cfg, inp, timed, ours_out, theirs_out, default_flags, their_flags) -> dict:
    """The calibration's JSON: medians, ratios (ours / theirs), equivalence of the logits."""
    theirs = timed.pop("fastdllm")
    ours_all = timed
    ours, plain = ours_all["research"], ours_all["plain"]  # the reference engine's calibrated impl first

    def ratios(mine: dict) -> dict:
        return {k: round(mine[k]["median_ms"] / theirs[k]["median_ms"], 4) for k in ("refresh", "decode")}

    ratio = ratios(ours)
    import transformers

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "config": args.config,
        "dtype": args.dtype,
        "model": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                                      "embedding_size")},
        "shapes": {"batch": 1, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
                   "block_length": args.block_length, "refresh_tokens": args.prompt_len + args.gen_length,
                   "decode_tokens": args.block_length, "decode_block": [inp["s"], inp["e"]],
                   "decode_keys": args.prompt_len + args.gen_length},
        "timing": {"warmup": args.warmup, "iters": args.iters, "stat": "median", "order": args.order,
                   "interleaved": True, "peak_mem_gib": peak_gib(device),
                   "clock": "cuda events" if device.type == "cuda" else "perf_counter"},
        # "ours": the reference engine as the benchmarks run it (attention_impl="research");
        # "ours_plain": its faster layout (attention_impl="plain"), for the record.
        "ours": {"attention_impl": "research", "refresh_ms": ours["refresh"]["median_ms"],
                 "decode_ms": ours["decode"]["median_ms"]},
        "ours_plain": {"attention_impl": "plain", "refresh_ms": plain["refresh"]["median_ms"],
                       "decode_ms": plain["decode"]["median_ms"]},
        "fastdllm": {"refresh_ms": theirs["refresh"]["median_ms"], "decode_ms": theirs["decode"]["median_ms"]},
        "ratio_ours_over_fastdllm": ratio,
        "ratio_ours_plain_over_fastdllm": ratios(plain),
        "tolerance": args.tolerance,
        "within_15pct": {k: abs(r - 1.0) <= args.tolerance for k, r in ratio.items()},
        "equivalence": {
            "refresh_logits": compare(ours_out["research"]["refresh_logits"], theirs_out["refresh_logits"]),
            "decode_logits": compare(ours_out["research"]["decode_logits"], theirs_out["decode_logits"]),
            "research_vs_plain_decode_logits": compare(ours_out["research"]["decode_logits"],
                                                       ours_out["plain"]["decode_logits"]),
        },
        "details": {"ours": ours_all, "fastdllm": theirs},
        "sdpa_flags": {"ours": default_flags, "fastdllm": their_flags},
        "fastdllm_source": fastdllm_source(args.fastdllm_dir),
        "shims": SHIMS,
        "compiled_graphs": _dynamo_graphs(),  # theirs, plus ours with --variants
        "dynamo_disabled": os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("", "0"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    return result


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fastdllm-dir", default=".gpu/fastdllm")
    ap.add_argument("--config", default="8b", choices=["8b", "small"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--block-index", type=int, default=0, help="which block the decode step recomputes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.15, help="allowed |ours/theirs - 1|")
    ap.add_argument("--variants", action="store_true",
                    help="also time ours research with a compiled attention call, and plain without the key mask")
    ap.add_argument("--profile", action="store_true",
                    help="profile each decode and refresh (host ops, kernels, host waits, GPU busy, top host ops)")
    ap.add_argument("--order", default="ours,theirs", choices=["ours,theirs", "theirs,ours"],
                    help="whose calls come first in each timing round")
    ap.add_argument("--out", default=None)


def main(args: argparse.Namespace) -> int:
    try:
        device, cfg = _check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = _result(args, device, cfg, *_time_both(args, device, cfg))
    text = json.dumps(result, indent=1)
    print(text)
    eq, ours, theirs, ratio = (result[k] for k in ("equivalence", "ours", "fastdllm", "ratio_ours_over_fastdllm"))
    print(f"[calibrate] {result['device']} {args.config} {args.dtype}: "
          f"refresh ours {ours['refresh_ms']:.3f} ms / fastdllm {theirs['refresh_ms']:.3f} ms "
          f"= {ratio['refresh']:.3f}; decode ours {ours['decode_ms']:.3f} ms / fastdllm "
          f"{theirs['decode_ms']:.3f} ms = {ratio['decode']:.3f}; within +-{args.tolerance:.0%}: "
          f"{result['within_15pct']} (plain impl: {result['ratio_ours_plain_over_fastdllm']}); max |dlogit| refresh {eq['refresh_logits']['max_abs_diff']:.3g}, "
          f"decode {eq['decode_logits']['max_abs_diff']:.3g}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
