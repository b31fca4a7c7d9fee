"""``python -m vllm_odb.bench profile-decode-step``: where a batch-1 decode step of the vLLM engine
spends its time (issue #8's per-step profile); ``--batch N`` keeps N requests in every step.

    python -m vllm_odb.bench profile-decode-step --model llada-8b --out profile-llada.json

Runs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the profiler sees the
worker's kernels) on a full-size config with random weights (``load_format="dummy"``): one
request, prompt ``--prompt-len``, gen ``--gen-length``. Random weights commit one token per step,
so after the first block nearly every engine step is a decode step. The command drives
``LLMEngine.step()`` itself, skips ``--skip`` steps, then profiles ``--steps`` steps with
``torch.profiler`` (CPU and CUDA activity). Per step it reports the wall time of ``step()`` and the
GPU's busy time inside it (the union of kernel and memcpy intervals), split into matmul,
attention and other kernels; the busy time against the weight-streaming floor says how much of
the step is the forward and how much is the GPU waiting for the host (split into before the first
kernel, between kernels and after the last one; the top host ops say what the host was doing).
The same number of steps is first timed without the profiler, which slows the host side, and a
third run of them under cProfile names the Python functions the host spends its time in.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import tempfile
import time

from vllm_odb.engine import REFRESH_MARK

MATMUL = ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "cublas", "matmul")
ATTENTION = ("flash", "attn", "attention", "fmha")


def kind_of(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in MATMUL):
        return "matmul"
    return "other"


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def analyse(trace: dict, step_marks: list[tuple[float, float]]) -> dict:
    """Per marked step (CPU wall interval, us): GPU busy ms and per-kind kernel ms."""
    gpu = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
           and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu = [e for e in trace.get("traceEvents", [])
           if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")
           and not str(e.get("name", "")).startswith("engine_step_")]
    refreshes = [e["ts"] for e in trace.get("traceEvents", []) if e.get("ph") == "X"
                 and e.get("name") == REFRESH_MARK]
    steps = []
    names, host = {}, {}  # every step's kernels and host ops
    names_r, host_r = {}, {}  # the steps with a refresh: theirs alone
    for s0, s1 in step_marks:
        inside = [e for e in gpu if s0 <= e["ts"] < s1]
        refresh = any(s0 <= t < s1 for t in refreshes)
        for e in cpu:  # host ops that start inside the step, inclusive time (nested ops count twice)
            if s0 <= e["ts"] < s1:
                for d in (host, host_r) if refresh else (host,):
                    d[e["name"][:90]] = d.get(e["name"][:90], 0.0) + e["dur"] / 1e3
        kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
        for e in inside:
            k = kind_of(e["name"]) if e["cat"] == "kernel" else "other"
            kinds[k] += e["dur"] / 1e3
            for d in (names, names_r) if refresh else (names,):
                d[e["name"][:90]] = d.get(e["name"][:90], 0.0) + e["dur"] / 1e3
        busy = union_ms([(e["ts"], e["ts"] + e["dur"]) for e in inside])
        first = min((e["ts"] for e in inside), default=s1)
        last = max((e["ts"] + e["dur"] for e in inside), default=s1)
        steps.append({"wall_ms": round((s1 - s0) / 1e3, 3), "gpu_busy_ms": round(busy, 3),
                      # the GPU's idle time, split: before its first kernel (host scheduling and input
                      # preparation), between kernels (launch gaps, host syncs) and after its last one
                      "idle_before_ms": round((first - s0) / 1e3, 3),
                      "idle_between_ms": round(max(0.0, (last - first) / 1e3 - busy), 3),
                      "idle_after_ms": round(max(0.0, s1 - last) / 1e3, 3),
                      "kernels": len(inside), **{f"{k}_ms": round(v, 3) for k, v in kinds.items()},
                      "refresh": refresh})

    def top(d: dict, n: int) -> list[dict]:
        return [{"name": k, "ms_total": round(ms, 3)} for k, ms in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"steps": steps, "top_kernels_ms": top(names, 20), "top_host_ops_ms": top(host, 30),
            "refresh_top_kernels_ms": top(names_r, 20), "refresh_top_host_ops_ms": top(host_r, 30)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=("llada-8b", "dream-7b"), required=True)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1,
                    help="requests kept in every step (a finished one is replaced at once)")
    ap.add_argument("--skip", type=int, default=40, help="engine steps before profiling")
    ap.add_argument("--steps", type=int, default=24, help="engine steps profiled")
    ap.add_argument("--speculative", action="store_true",
                    help="profile the jump-share engine (speculative_config={'method': 'odb'}) instead of the plain one")
    ap.add_argument("--traces", default=None,
                    help="replay these recorded decoding traces (bench speed's --traces format) instead of "
                         "random-weight dynamics: requests decode, refresh and cut their canvas as traced "
                         "(--gen-length picks the traces; --prompt-len is ignored)")
    ap.add_argument("--method", default=None, choices=("fast-dllm", "odb-alp", "odb"),
                    help="the method each request names (default: the engine's, fast-dllm; odb needs --speculative)")
    ap.add_argument("--engine-args", default="{}", type=_engine_args,
                    help='extra vLLM engine arguments as a JSON object, e.g. \'{"attention_backend": "FLASH_ATTN"}\'')
    ap.add_argument("--out", required=True)


def _engine_args(text: str) -> dict:
    from vllm_odb.bench.speed import _engine_args as parse

    return parse(text)


def main(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise SystemExit(f"profile-decode-step: --batch {args.batch}: give at least 1 request")
    faulthandler.dump_traceback_later(560, exit=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm_odb.bench.ceilings import measure
    from vllm_odb.bench.costs import weight_bytes
    from vllm_odb.bench.full_size import FULL_SIZE
    from vllm_odb.checkpoint import ModelSpec

    ceilings = measure()
    spec = ModelSpec.from_config(FULL_SIZE[args.model]())
    engine, step = _engine(args, spec)
    plain, res, python_host = _profile_steps(engine, step, args)
    floor_ms = weight_bytes(spec) / (ceilings["copy_bandwidth_gbs"] * 1e9) * 1e3
    summary = _summary(res, plain, floor_ms)
    out = {"model": args.model, "engine": "jump-share" if args.speculative else "plain", "batch": args.batch,
           "engine_args": args.engine_args, "method": args.method or "fast-dllm", "traces": args.traces,
           "weights": "random (load_format=dummy)", "prompt_len": None if args.traces else args.prompt_len, "gen_length": args.gen_length, "block_length": args.block_length, "ceilings": ceilings,
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary, **res, "python_host_cprofile": python_host}
    print(json.dumps(summary))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def _requests(args, spec):
    """(prompts, sampling params) the profiled requests cycle through: one random prompt of
    ``--prompt-len`` (random-weight dynamics), or ``--traces``' requests of ``--method`` at
    ``--gen-length``, replayed as ``bench speed`` replays them."""
    import torch
    from vllm import SamplingParams

    method = {"method": args.method} if args.method else {}
    if not args.traces:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, spec.mask_token_id - 1, (args.prompt_len,), generator=g).tolist()
        return [prompt], [SamplingParams(temperature=0.0, max_tokens=args.gen_length, ignore_eos=True,
                                         extra_args=method or None)]
    from vllm_odb.bench.speed import _replay_prompts, _trace_key

    with open(args.traces) as f:
        traces = json.load(f)["traces"]
    key = _trace_key(args.method or "fast-dllm", args.gen_length, "vllm")
    if key not in traces:
        raise SystemExit(f"profile-decode-step: --traces {args.traces} has no {key!r} (it has {sorted(traces)})")
    tr = traces[key]
    params = [SamplingParams(temperature=0.0, max_tokens=args.gen_length, stop_token_ids=[spec.eos_token_id],
                             extra_args={**method, "replay": t["replay"]}) for t in tr]
    return _replay_prompts(tr, spec), params


def _engine(args, spec):
    """The engine in this process on the random-weight config, the requests of ``_requests``
    added and ``--skip`` steps taken (after a warm-up request of the first one's shape)."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from vllm_odb.bench.full_size import write_config_dir

    if args.method == "odb" and not args.speculative:
        raise SystemExit("profile-decode-step: --method odb needs --speculative (a jump-share engine)")
    prompts, params = _requests(args, spec)
    path = write_config_dir(args.model, tempfile.mkdtemp(prefix=args.model))
    jump = {"speculative_config": {"method": "odb"}} if args.speculative else {}
    llm = LLM(model=path, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              # the jump-share canvas reaches past the block (its draft rows, up to ridge_rows)
              max_model_len=max(map(len, prompts)) + args.gen_length + (1024 if args.speculative else 64),
              gpu_memory_utilization=0.85, max_num_seqs=max(8, args.batch), seed=0,
              additional_config={"odb": {"block_length": args.block_length, "gen_length": args.gen_length}},
              **{**jump, **args.engine_args})
    engine = llm.llm_engine
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params[0], use_tqdm=False)  # warm this shape
    added = iter(range(1 << 30))

    live: set[str] = set()

    def step() -> None:
        """One engine step with ``--batch`` requests in it: a finished request is replaced by the
        next (jump-share can finish a random-weight request in fewer steps than ``--skip``; a
        replayed one ends where its trace did), whose first steps are refreshes."""
        while len(live) < args.batch:
            i = next(added)
            rid = f"profiled-{i}"
            engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]), params[i % len(params)])
            live.add(rid)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)

    for _ in range(args.skip):
        step()
    return engine, step


def _profile_steps(engine, step, args):
    """``--steps`` engine steps three times: timed without a profiler (which slows the host side),
    under torch.profiler (analysed per step) and under cProfile (the host's Python functions)."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    plain = []  # step wall without the profiler, whose host-side recording slows the host
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        plain.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            with record_function(f"engine_step_{i}"):
                step()
    torch.cuda.synchronize()
    pyprof = cProfile.Profile()  # where the host's Python time goes, per function
    pyprof.enable()
    for _ in range(args.steps):
        step()
    pyprof.disable()
    stats = pstats.Stats(pyprof)

    def top_py(key: int) -> list[dict]:  # key 2: own time, 3: cumulative
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][key])[:30]
        return [{"function": f"{os.path.basename(f)}:{line}:{name}", "ms_per_step": round(v[key] * 1e3 / args.steps, 3)}
                for (f, line, name), v in rows]

    while engine.has_unfinished_requests():
        engine.step()
    trace_path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        trace = json.load(f)
    marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                   if e.get("ph") == "X" and str(e.get("name", "")).startswith("engine_step_")
                   and e.get("cat") == "user_annotation")
    return plain, analyse(trace, marks), {"own_time": top_py(2), "cumulative": top_py(3)}


def _summary(res: dict, plain: list[float], floor_ms: float) -> dict:
    """p50s over the decode steps: the steps without a refresh whose kernel count is within 15% of
    their median. (Overlapped steps do not line up with the host's step exactly, so their counts
    spread by a few percent: the most common count, used before, kept 2 steps of 24 on the H200;
    the steps around a refresh or a block's first plan launch far more or fewer.)"""
    counts = [s["kernels"] for s in res["steps"] if s["kernels"] > 0]
    if not counts:
        raise SystemExit(f"profile-decode-step: none of the {len(res['steps'])} profiled steps launched a GPU "
                         "kernel (no request in them, or the profiler saw no CUDA activity)")
    no_refresh = [s for s in res["steps"] if s["kernels"] > 0 and not s.get("refresh")] or \
        [s for s in res["steps"] if s["kernels"] > 0]
    mid = statistics.median(s["kernels"] for s in no_refresh)
    decode = [s for s in no_refresh if abs(s["kernels"] - mid) <= 0.15 * mid]
    summary = {
        "steps_profiled": len(res["steps"]), "decode_steps": len(decode),
        "wall_ms_p50": round(statistics.median(s["wall_ms"] for s in decode), 3),
        "wall_ms_unprofiled_p50": round(statistics.median(plain), 3),
        "gpu_busy_ms_p50": round(statistics.median(s["gpu_busy_ms"] for s in decode), 3),
        "matmul_ms_p50": round(statistics.median(s["matmul_ms"] for s in decode), 3),
        "attention_ms_p50": round(statistics.median(s["attention_ms"] for s in decode), 3),
        "other_ms_p50": round(statistics.median(s["other_ms"] for s in decode), 3),
        **{f"{k}_p50": round(statistics.median(s[k] for s in decode), 3)
           for k in ("idle_before_ms", "idle_between_ms", "idle_after_ms")},
        "weight_stream_floor_ms": round(floor_ms, 3),
    }
    summary["gpu_busy_over_floor"] = round(summary["gpu_busy_ms_p50"] / floor_ms, 3)
    summary["wall_over_floor"] = round(summary["wall_ms_p50"] / floor_ms, 3)
    summary["gpu_idle_fraction"] = round(1 - summary["gpu_busy_ms_p50"] / summary["wall_ms_p50"], 3)
    summary["unprofiled_wall_over_floor"] = round(summary["wall_ms_unprofiled_p50"] / floor_ms, 3)
    # Steps with a refresh side forward (its profiler range, engine/model_state.py REFRESH_MARK).
    refresh = [s for s in res["steps"] if s.get("refresh")]
    summary["refresh_steps"] = len(refresh)
    if refresh:
        summary.update({f"refresh_{k}_p50": round(statistics.median(s[k] for s in refresh), 3)
                        for k in ("wall_ms", "gpu_busy_ms", "matmul_ms", "attention_ms", "other_ms", "kernels",
                                  "idle_before_ms", "idle_between_ms", "idle_after_ms")})
    return summary
