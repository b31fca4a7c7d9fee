"""``python -m vllm_odb.bench speed``: throughput, latency and per-step cost of the decoding methods
on the reference engine and on vLLM, side by side, in one JSON file of rows (plus the per-step
points of the roofline); ``python -m vllm_odb.bench report`` turns it into tables and plots.

Two kinds of rows:

- **tiny checkpoints** (``--model checkpoints/tiny-llada``): real dynamics (confidences, EOS, ALP
  cuts) at toy cost.
- **full-size configs with random weights** (``--model llada-8b`` / ``dream-7b``): real per-step
  cost, and dynamics by **trace replay** (``replay: true``). A random model is never confident,
  so on its own every method would commit one token per step and ALP would never fire. Instead,
  each request replays what the method did on the trained tiny checkpoint of the same family
  (bench/replay.py: commits per forward, canvas cuts, the last block), so the full-size engine
  makes exactly those forwards and the timing is of real work at real size.

Traces are recorded with the reference engine, one request alone at a time (the draft budget of a
request alone). For the vLLM engine they are recorded with ``early_stop``: vLLM ends a request at
the block that emits its EOS (the parity runs show the engine's NFE equal to the reference's with
early termination), while the reference engine, like the research code, decodes the whole canvas
unless the method stops early. Replayed full-size prompts are random ids of the traced prompts'
lengths. Tokens counted for throughput are response tokens (up to the first end marker) of the
traced run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from vllm_odb.bench.profile import ALLOC_KEYS
from vllm_odb.bench.replay import Replay, generate_traced
from vllm_odb.bench.research import attention_impl, set_attention_impl
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.config import METHODS

# Benchmark names -> (preset, extra knobs). The vLLM engine runs the dual cache only.
BENCH_METHODS = {
    "vanilla": ("vanilla", {}),
    "fast-dllm-prefix": ("fast-dllm", {"cache": "prefix"}),
    "fast-dllm": ("fast-dllm", {}),
    "odb-alp": ("odb-alp", {}),
    "odb": ("odb", {}),
}
VLLM_METHODS = ("fast-dllm", "odb-alp", "odb")
FULL_SIZE_TRACES = {"llada-8b": "checkpoints/tiny-llada", "dream-7b": "checkpoints/tiny-dream"}
# Shipped traces of those checkpoints (``python -m vllm_odb.bench traces``), once they decode like
# the real models (worked-suite checkpoints): the default dynamics of a full-size row where the file
# exists. Read only: a method or gen length they lack is an error naming the command.
DEFAULT_TRACES = {"llada-8b": "benchmarks/traces/tiny-llada.json", "dream-7b": "benchmarks/traces/tiny-dream.json"}
SUITE_SEED = 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--engine", choices=("reference", "vllm"), required=True)
    ap.add_argument("--model", required=True,
                    help="a checkpoint directory (real dynamics) or llada-8b / dream-7b (random weights, trace replay)")
    ap.add_argument("--trace-model", help="trained checkpoint whose dynamics a full-size model replays "
                    "(default: the tiny checkpoint of the same family)")
    ap.add_argument("--methods", default="vanilla,fast-dllm-prefix,fast-dllm,odb-alp,odb")
    ap.add_argument("--gen-lengths", default="256,512,1024")
    ap.add_argument("--batches", default="1,8,32,64", help="concurrent requests")
    ap.add_argument("--requests", type=int, default=4, help="requests of a batch-1 row (run one after another)")
    ap.add_argument("--row-seconds", type=float, default=60.0,
                    help="a batch-1 row stops issuing requests after this long (at least one runs)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--ridge-rows", type=int,
                    help="jump-share draft budget (default on the vLLM engine: the GPU's ridge point, as the "
                         "engine's; else the method's)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reference-impl", default="research", choices=("research", "plain"),
                    help="reference engine's attention: 'research' keeps the cache as the research code does "
                         "(calibrated against Fast-dLLM: bench calibrate-fastdllm), 'plain' is our faster "
                         "layout; methods the research code lacks (jump-share) always run 'plain'")
    ap.add_argument("--traces", help="JSON file of recorded traces: read if present, else written (default for "
                    "llada-8b / dream-7b: the shipped benchmarks/traces/tiny-*.json, read only)")
    ap.add_argument("--engine-args", default="{}", type=_engine_args,
                    help='extra vLLM engine arguments as a JSON object, e.g. \'{"async_scheduling": false}\'')
    ap.add_argument("--out", required=True, help="results JSON (rows are appended to an existing file)")


def _engine_args(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object of vLLM engine arguments")
    return value


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--{name} {text!r}: integers >= 1")
    return vals


def method_config(method: str, gen: int, args) -> DecodeConfig:
    preset, extra = BENCH_METHODS[method]
    knobs = dict(extra, gen_length=gen, block_length=args.block_length)
    if preset != "vanilla":
        knobs["threshold"] = args.threshold
    if args.ridge_rows and METHODS[preset].get("jump"):  # the draft budget: jump-share methods only
        knobs["ridge_rows"] = args.ridge_rows
    return DecodeConfig.for_method(preset, **knobs)


# A jump-share method's trace holds the drafts it accepted alone (batch 1), and a replay forces those
# commits whatever the step verified. At a batch whose share of the draft budget is the window
# (knobs.step_width) no draft fits and the engine decodes exactly as its plain twin, so such a row
# replays the twin's traces: the jump trace would credit it with drafts it never laid out.
PLAIN_TWIN = {"odb": "odb-alp"}


def replay_method(method: str, gen: int, batch: int, args, shift: int, traces: dict, engine: str) -> tuple[str, str]:
    """The method whose traces a full-size ``method`` row at ``batch`` replays, and the row's note
    on it ("" when it is the method's own and exact)."""
    from vllm_odb.engine.knobs import step_width

    cfg = method_config(method, gen, args)
    if not cfg.jump or batch == 1:
        return method, ""
    if step_width(cfg, shift, batch) > cfg.block_length + shift:
        return method, (f"drafts fit at batch {batch} but fewer than alone: the replayed drafts (recorded alone) "
                        "are an upper bound")
    twin = PLAIN_TWIN.get(method)
    if twin is None or _trace_key(twin, gen, engine) not in traces:
        return method, (f"no draft fits at batch {batch}, yet the replay forces the drafts accepted alone: "
                        "tokens per forward are overstated")
    return twin, f"no draft fits at batch {batch}: replays {twin}'s traces (the engine decodes as {twin})"


def _trace_key(method: str, gen: int, engine: str) -> str:
    return f"{method}|{gen}|{engine}"


def record_traces(path: str, methods, gens, n: int, args, device) -> dict:
    """Each method's dynamics on the trained checkpoint: one trace per suite prompt, alone."""
    from vllm_odb.reference.generate import response_ids
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny import suites

    ck = load_checkpoint(path, dtype=torch.float32, device=device)
    prompts = [ck.encode_chat(e.prompt) for e in suites.for_checkpoint(path).make_suite(SUITE_SEED, n)]
    traces = {}
    jobs = [(m, g) for m in methods for g in gens]
    for m, g in tqdm(jobs, desc=f"traces on {os.path.basename(path)}", file=sys.stderr):
        cfg = method_config(m, g, args)
        if args.engine == "vllm":
            cfg = cfg.replace(early_stop=True)
        count = min(n, args.requests) if m == "vanilla" else n  # vanilla: fixed dynamics, batch-1 rows only
        rows = []
        for p in prompts[:count]:
            out = generate_traced(ck.model, [p], cfg, ck.special, record=True)
            rows.append({"prompt_len": len(p), "response_tokens": len(response_ids(out.tokens[0], ck.special)),
                         "replay": out.stats["trace"][0]})
        traces[_trace_key(m, g, args.engine)] = rows
    return {"trace_model": path, "suite_seed": SUITE_SEED, "traces": traces}


def _load_or_record(args, methods, gens, n, device) -> dict:
    if args.traces and os.path.exists(args.traces):
        with open(args.traces) as f:
            data = json.load(f)
        missing = [(m, g) for m in methods for g in gens if _trace_key(m, g, args.engine) not in data["traces"]]
        if not missing:
            return data
        more = record_traces(data["trace_model"], [m for m, _ in missing], sorted({g for _, g in missing}), n, args,
                             device)
        data["traces"].update(more["traces"])
    else:
        data = record_traces(args.trace_model, methods, gens, n, args, device)
    if args.traces:
        with open(args.traces, "w") as f:
            json.dump(data, f)
    return data


def check_default_traces(path: str, engine: str, methods, gens, n: int) -> None:
    """The shipped traces are read only: each requested method and gen length must be there, with
    ``n`` requests (vanilla: one row of batch 1 at least)."""
    with open(path) as f:
        traces = json.load(f)["traces"]
    short = [_trace_key(m, g, engine) for m in methods for g in gens
             if len(traces.get(_trace_key(m, g, engine), [])) < (1 if m == "vanilla" else n)]
    if short:
        raise ValueError(f"--traces {path} (the default) lacks {short} for {n} requests; record them with "
                         "python -m vllm_odb.bench traces ... --out FILE and pass --traces FILE")


def enough_traces(traces: list, method: str, gen: int, batch: int, engine: str) -> bool:
    """A batch row needs that many traced requests. With fewer the row is skipped, and this says
    so rather than leave it out silently."""
    if len(traces) >= batch:
        return True
    print(f"warning: row {method} gen {gen} batch {batch} ({engine}) skipped: the traces hold {len(traces)} requests "
          f"for it; record at least {batch} (python -m vllm_odb.bench traces --requests {batch})", file=sys.stderr)
    return False


def _replay_prompts(traces: list[dict], spec) -> list[list[int]]:
    """Random ids (below the mask id) of the traced prompts' lengths: a random model reads them
    all alike, only the lengths shape the forwards."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, spec.mask_token_id, (t["prompt_len"],), generator=gen).tolist() for t in traces]


def _per_request(batch: int, latencies: list[float], tokens: list[int]) -> dict:
    """Batch-1 rows: each request's latency and response tokens, in request order (request i is
    the same traced request on every engine), so a ratio can use the requests both rows ran."""
    if batch != 1:
        return {}
    return {"request_latency_s": [round(x, 4) for x in latencies], "request_tokens": list(tokens)}


def _roofline(traces: list[dict], spec, cfg: DecodeConfig, engine: str, batch: int) -> dict:
    """The row's roofline (bench/roofline.py): its requests' forwards (``traces``, ``{prompt_len,
    replay}`` each, in run order) at this run's measured ceilings, the whole batch at once (the
    hardware's bound, not the engine's concurrency cap); {} without them."""
    from vllm_odb.bench.ceilings import CEILINGS
    from vllm_odb.bench.roofline import row_seconds

    if not traces or not CEILINGS.get("bf16_matmul_tflops") or not CEILINGS.get("copy_bandwidth_gbs"):
        return {}
    ceil = {k: CEILINGS[k] for k in ("bf16_matmul_tflops", "copy_bandwidth_gbs")}
    seconds, forwards = row_seconds(traces, spec, cfg, engine, batch, *ceil.values())
    return {"roofline_s": float(f"{seconds:.6g}"), "roofline_forwards": forwards, "roofline_ceilings": ceil}


def _summary(latencies: list[float], wall: float, tokens: int) -> dict:
    lat = sorted(latencies)
    return {"tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
            "latency_p50_s": round(statistics.median(lat), 4),
            "latency_p90_s": round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 4),
            "wall_s": round(wall, 3), "response_tokens": tokens}


# ----------------------------------------------------------------------------- reference engine


def _random_full_size(name: str, dtype, device):
    from vllm_odb.bench.full_size import FULL_SIZE
    from vllm_odb.checkpoint import ModelSpec, special_tokens
    from vllm_odb.reference.model import DiffusionLM

    spec = ModelSpec.from_config(FULL_SIZE[name]())
    with torch.device("meta"):
        model = DiffusionLM(spec)
    model = model.to(dtype).to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model, spec, special_tokens(spec)


def reference_impl(wanted: str, cfg: DecodeConfig) -> str:
    """The reference model's ``attention_impl`` for a method: ``wanted`` unless the method uses
    what the research code's cache layout does not cover (draft branches, suffix views, DCU)."""
    return "plain" if cfg.jump or cfg.suffix_window or cfg.dcu else wanted


def _warm_up(model, jobs, args, special, full, traces, spec, suite) -> None:
    """One untimed request per attention impl the rows use, before any row: the first forwards of
    a process pay for kernel selection and, for the research impl's compiled attention (LLaDA on
    CUDA), for compiling it (a fixed-shape graph, then a dynamic one at the second shape). The
    request is a cached method's (it makes both refresh and block-step shapes) at the shortest
    gen length."""
    done = set()
    for m, g, _ in sorted(jobs, key=lambda j: (BENCH_METHODS[j[0]][1].get("cache") == "prefix",
                                               BENCH_METHODS[j[0]][0] == "vanilla", j[1])):
        cfg = method_config(m, g, args)
        impl = reference_impl(args.reference_impl, cfg)
        if impl in done:
            continue
        done.add(impl)
        set_attention_impl(model, impl)
        if full:
            tr = traces["traces"][_trace_key(m, g, "reference")][0]
            prompt, replay = _replay_prompts([tr], spec)[0], [Replay.from_dict(tr["replay"])]
        else:
            prompt, replay = suite[0], None
        generate_traced(model, [prompt], cfg, special, replay=replay)


def run_reference(args, methods, gens, batches, emit) -> None:
    from vllm_odb.reference.generate import response_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    full = args.model in FULL_SIZE_TRACES
    traces = _load_or_record(args, methods, gens, max(batches + [args.requests]), device) if full else None
    if full:
        model, spec, special = _random_full_size(args.model, dtype, device)
    else:
        from vllm_odb.reference.loader import load_checkpoint
        from vllm_odb.tiny import suites

        ck = load_checkpoint(args.model, dtype=dtype, device=device)
        model, spec, special = ck.model, ck.model.spec, ck.special
        suite = [ck.encode_chat(e.prompt) for e in
                 suites.for_checkpoint(args.model).make_suite(SUITE_SEED, max(batches + [args.requests]))]
    jobs = [(m, g, b) for m in methods for g in gens for b in batches]
    _warm_up(model, jobs, args, special, full, traces, spec, None if full else suite)
    for m, g, b in tqdm(jobs, desc=f"reference {args.model}", file=sys.stderr):
        cfg = method_config(m, g, args)
        set_attention_impl(model, reference_impl(args.reference_impl, cfg))
        if full:
            tr = traces["traces"][_trace_key(m, g, "reference")]
            if not enough_traces(tr, m, g, b, "reference"):
                continue
            prompts = _replay_prompts(tr, spec)
            replays = [Replay.from_dict(t["replay"]) for t in tr]
        else:
            prompts, replays = suite, None
        groups = [[i] for i in range(args.requests)] if b == 1 else [list(range(b))]
        lat, tokens, nfe, refresh, decoded, n_req, per_req, ran = [], 0, 0, 0, 0, 0, [], []
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t_row = time.perf_counter()
        for group in groups:
            if b == 1 and lat and time.perf_counter() - t_row > args.row_seconds:
                break
            t0 = time.perf_counter()
            out = generate_traced(model, [prompts[i] for i in group], cfg, special,
                                  replay=[replays[i] for i in group] if replays else None, record=not full)
            if device == "cuda":
                torch.cuda.synchronize()
            lat += [time.perf_counter() - t0] * len(group)
            for j, i in enumerate(group):
                trace = replays[i] if replays else Replay.from_dict(out.stats["trace"][j])
                per_req.append(tr[i]["response_tokens"] if full else len(response_ids(out.tokens[j], special)))
                ran.append({"prompt_len": len(prompts[i]), "replay": trace.to_dict()})
                tokens += per_req[-1]
                decoded += sum(map(sum, trace.commits))
            nfe += sum(out.nfe)
            refresh += sum(out.stats["refresh_tokens"])
            n_req += len(group)
        wall = time.perf_counter() - t_row
        emit({"method": m, "engine": "reference", "attention_impl": attention_impl(model),
                     "model": _model_name(args.model), "replay": full,
                     "trace_model": _model_name(traces["trace_model"]) if full else None,
                     "gen_length": g, "batch": b, "requests": n_req, **_summary(lat, wall, tokens),
                     "nfe": round(nfe / n_req, 2), "tokens_per_forward": round(decoded / max(1, nfe), 3),
                     "refresh_tokens": round(refresh / n_req, 1),
                     "gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
                     **_per_request(b, lat, per_req), **_roofline(ran, spec, cfg, "reference", b)}, [])


def _model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


# ----------------------------------------------------------------------------- vLLM engine


def _vllm_engine(args, jump: bool, max_prompt: int, max_gen: int, ridge: int, full: bool):
    from vllm import LLM

    from vllm_odb.bench.full_size import write_config_dir

    path = write_config_dir(args.model, tempfile.mkdtemp(prefix=args.model)) if full else args.model
    section = {"block_length": args.block_length, "gen_length": max_gen, "threshold": args.threshold,
               "ridge_rows": ridge}
    extra = {"speculative_config": {"method": "odb"}} if jump else {}
    return LLM(model=path, dtype=args.dtype, max_model_len=max_prompt + max_gen + 2 * ridge + 2 * args.block_length,
               gpu_memory_utilization=0.85, max_num_seqs=64, seed=0, skip_tokenizer_init=full,
               load_format="dummy" if full else "auto", additional_config={"odb": section},
               **{**extra, **getattr(args, "engine_args", {})})


def _run_vllm_batch(llm, prompts, params) -> tuple[list[float], list[list[int]]]:
    """All requests at once through the engine's step loop: per-request latency and token ids."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    t0 = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", TokensPrompt(prompt_token_ids=p), sp)
    done: dict[int, tuple[float, list[int]]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:  # its id: "bench-<i>" (vLLM may append "-<random>")
                done[int(out.request_id.split("-")[1])] = (time.perf_counter() - t0, list(out.outputs[0].token_ids))
    ordered = [done[i] for i in range(len(prompts))]
    return [t for t, _ in ordered], [ids for _, ids in ordered]


def run_vllm(args, methods, gens, batches, emit) -> None:
    from vllm import SamplingParams

    from vllm_odb.bench.full_size import FULL_SIZE
    from vllm_odb.checkpoint import ModelSpec
    from vllm_odb.engine import PROFILE_ENV
    from vllm_odb.engine.metrics import snapshot

    skipped = [m for m in methods if m not in VLLM_METHODS]
    if skipped:
        print(f"vllm engine: skipping {skipped} (the engine runs the dual cache; they run on the reference "
              "engine)", file=sys.stderr)
    methods = [m for m in methods if m in VLLM_METHODS]
    full = args.model in FULL_SIZE_TRACES
    n = max(batches + [args.requests])
    traces = _load_or_record(args, methods, gens, n, "cuda") if full else None
    if full:
        spec = ModelSpec.from_config(FULL_SIZE[args.model]())
        end_ids, prompts_by = None, None
    else:
        from vllm_odb.reference.loader import load_checkpoint
        from vllm_odb.tiny import suites

        ck = load_checkpoint(args.model)
        spec, end_ids = ck.model.spec, set(ck.special.end_ids)
        prompts_by = [ck.encode_chat(e.prompt) for e in suites.for_checkpoint(args.model).make_suite(SUITE_SEED, n)]
        del ck
    profile = os.path.join(tempfile.mkdtemp(), "steps.jsonl")
    os.environ[PROFILE_ENV] = profile  # the engine's step profiler (bench/profile.py)
    if args.ridge_rows is None:  # the engine's own default on this GPU (engine/knobs.py)
        from vllm_odb.engine.knobs import gpu_draft_budget

        args.ridge_rows = gpu_draft_budget(args.block_length)
    for jump in (False, True):
        ms = [m for m in methods if method_config(m, gens[0], args).jump == jump]
        if not ms:
            continue
        ridge = args.ridge_rows or method_config(ms[0], gens[0], args).ridge_rows
        max_prompt = (max(t["prompt_len"] for v in traces["traces"].values() for t in v) if full
                      else max(map(len, prompts_by)))
        llm = _vllm_engine(args, jump, max_prompt, max(gens), ridge, full)
        cap = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        jobs = [(m, g, b) for m in ms for g in gens for b in batches]
        for m, g, b in tqdm(jobs, desc=f"vllm {args.model} {'jump-share' if jump else 'plain'} engine",
                            file=sys.stderr):
            preset = BENCH_METHODS[m][0]
            replayed, replay_note = m, ""
            if full:
                replayed, replay_note = replay_method(m, g, b, args, spec.logits_shift, traces["traces"], "vllm")
                tr = traces["traces"][_trace_key(replayed, g, "vllm")]
                if not enough_traces(tr, m, g, b, "vllm"):
                    continue
                prompts = _replay_prompts(tr, spec)
                # The replay ends a request with an EOS block (engine/sampler.py); vLLM, without a
                # tokenizer here, stops on it through stop_token_ids, as a served request stops.
                params = [SamplingParams(temperature=0.0, max_tokens=g, stop_token_ids=[spec.eos_token_id],
                                         extra_args={"method": preset, "replay": t["replay"]}) for t in tr]
            else:
                prompts = prompts_by
                params = [SamplingParams(temperature=0.0, max_tokens=g, extra_args={"method": preset})] * len(prompts)
            _run_vllm_batch(llm, prompts[:1], params[:1])  # warm this shape
            open(profile, "w").close()
            before = snapshot()
            groups = [[i] for i in range(args.requests)] if b == 1 else [list(range(b))]
            lat, tokens, n_req, per_req = [], 0, 0, []
            t_row = time.perf_counter()
            for group in groups:
                if b == 1 and lat and time.perf_counter() - t_row > args.row_seconds:
                    break
                ls, outs = _run_vllm_batch(llm, [prompts[i] for i in group], [params[i] for i in group])
                lat += ls
                for i, ids in zip(group, outs):
                    per_req.append(tr[i]["response_tokens"] if full else _response_len(ids, end_ids))
                    tokens += per_req[-1]
                n_req += len(group)
            wall = time.perf_counter() - t_row
            after = snapshot()
            d = {k: after[k] - before[k] for k in after}
            free, total = torch.cuda.mem_get_info()
            row = {"method": m, "engine": "vllm", "model": _model_name(args.model), "replay": full,
                   "trace_model": _model_name(traces["trace_model"]) if full else None,
                   "gen_length": g, "batch": b, "requests": n_req, **_summary(lat, wall, tokens),
                   "nfe": round(d["forwards"] / max(1, d["requests"]), 2),
                   "tokens_per_forward": round(d["tokens"] / max(1, d["forwards"]), 3),
                   "refresh_tokens": round(d["refresh_tokens"] / max(1, d["requests"]), 1),
                   # the share of them whose forwards replayed CUDA graphs (engine/model_state.py PagedRefresh)
                   "refresh_graphed": round(d["refresh_graph_tokens"] / max(1, d["refresh_tokens"]), 3),
                   "gpu_mem_gb": round((total - free) / 1e9, 2), "max_num_seqs": cap,
                   **_per_request(b, lat, per_req),
                   **_roofline(tr[:n_req] if full else [], spec, method_config(m, g, args), "vllm", b)}
            if replayed != m:
                row["traces_of"] = replayed
            notes = [replay_note] if replay_note else []
            if b > cap:
                notes.append(f"engine runs at most {cap} requests at once (jump-share canvas)")
            if notes:
                row["note"] = "; ".join(notes)
            steps: list[dict] = []
            row.update(_step_profile(profile, spec, b, m, g, steps, args, jump, llm))
            row.update(step_split(profile, n_req, wall))
            emit(row, steps)
        del llm
        torch.cuda.empty_cache()


def _response_len(ids: list[int], end_ids: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in end_ids:
            return i
    return len(ids)


def step_split(path: str, requests: int, wall: float) -> dict:
    """Where a row's wall time went, per request, from the engine's step profile: steps that
    decoded (``decode_s``), steps that ran a refresh (``refresh_step_s``, the decode beside it
    included, and overlap's idle forward before a refresh: that request is settled, not decoded),
    steps that did neither (``idle_s``: e.g. a last block that overlap sends out one step late, or
    a step of prompts only), and the time no step covers (``untimed_s``: request start and end, the
    gap before a step whose previous one is unknown). Counts of steps beside them (the untimed
    steps are in ``steps_per_request`` only). The roofline counts forwards; this says which steps
    the rest of the wall is in."""
    with open(path) as f:
        prof = [json.loads(line) for line in f if line.strip()]
    n = max(1, requests)
    timed = [s for s in prof if s["step_s"] is not None]
    kinds = {"decode": [s for s in timed if s["decode_reqs"] and not s["refresh_reqs"]],
             "refresh_step": [s for s in timed if s["refresh_reqs"]],
             "idle": [s for s in timed if not s["decode_reqs"] and not s["refresh_reqs"]]}
    out = {"steps_per_request": round(len(prof) / n, 2)}
    for k, steps in kinds.items():
        out[f"{k}_s_per_request"] = round(sum(s["step_s"] for s in steps) / n, 4)
        out[f"{k}_steps_per_request"] = round(len(steps) / n, 2)
    out["untimed_s_per_request"] = round(max(0.0, wall - sum(s["step_s"] for s in timed)) / n, 4)
    # the caching allocator's retries (a device sync each) and cudaMallocs, per request, in the
    # steps with a refresh and in all (bench/profile.py; absent off CUDA)
    for key in ALLOC_KEYS:
        if any(key in s for s in prof):
            out[f"{key}_per_request"] = round(sum(s.get(key, 0) for s in prof) / n, 2)
            out[f"refresh_step_{key}_per_request"] = round(
                sum(s.get(key, 0) for s in prof if s["refresh_reqs"]) / n, 2)
    return out


def _step_profile(path, spec, batch, method, gen, steps_out, args, jump, llm) -> dict:
    """Decode-only steps (every request of the row decoding) and refresh-only steps of the row's
    profile (bench/profile.py, ``VLLM_ODB_PROFILE``): p50 step time against the weight-streaming
    floor, and roofline points."""
    from vllm_odb.bench.ceilings import CEILINGS
    from vllm_odb.bench.costs import forward_flops, kv_bytes, weight_bytes

    with open(path) as f:
        prof = [json.loads(line) for line in f if line.strip()]
    full_batch = min(batch, llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    decode = [s for s in prof if s["step_s"] and s["refresh_reqs"] == 0 and s["decode_reqs"] == full_batch]
    refresh = [s for s in prof if s["refresh_reqs"] and s["refresh_s"]]
    wbytes = weight_bytes(spec)
    out = {}
    if decode:
        p50 = statistics.median(s["step_s"] for s in decode)
        out["decode_step_ms_p50"] = round(1e3 * p50, 3)
        if CEILINGS:
            floor = wbytes / (CEILINGS["copy_bandwidth_gbs"] * 1e9)
            out["weight_stream_floor_ms"] = round(1e3 * floor, 3)
            out["step_over_floor"] = round(p50 / floor, 3)
    for s in decode[:: max(1, len(decode) // 8)]:
        per_req_kv = s["kv_tokens"] // max(1, s["decode_reqs"])
        steps_out.append({"engine": "vllm", "model": _model_name(args.model), "method": method, "gen_length": gen,
                          "kind": "jump" if jump else "decode", "batch": s["decode_reqs"], "query_tokens": s["tokens"],
                          "kv_tokens": s["kv_tokens"], "ms": round(1e3 * s["step_s"], 3),
                          "flops": forward_flops(spec, s["tokens"], per_req_kv),
                          "bytes": wbytes + kv_bytes(spec, s["kv_tokens"])})
    for s in refresh[:: max(1, len(refresh) // 8)]:
        per_req = s["refresh_tokens"] // s["refresh_reqs"]
        steps_out.append({"engine": "vllm", "model": _model_name(args.model), "method": method, "gen_length": gen,
                          "kind": "refresh", "batch": s["refresh_reqs"], "query_tokens": s["refresh_tokens"],
                          "kv_tokens": s["refresh_tokens"], "ms": round(1e3 * s["refresh_s"], 3),
                          "flops": s["refresh_reqs"] * forward_flops(spec, per_req),
                          "bytes": wbytes + kv_bytes(spec, s["refresh_tokens"])})
    return out


# ----------------------------------------------------------------------------- entry point


def main(args: argparse.Namespace) -> int:
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in BENCH_METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {list(BENCH_METHODS)}")
        gens, batches = _ints(args.gen_lengths, "gen-lengths"), _ints(args.batches, "batches")
        for m in methods:
            for g in gens:
                method_config(m, g, args)  # every knob checked before any model loads
        full = args.model in FULL_SIZE_TRACES
        if full:
            if not args.traces and not args.trace_model and os.path.exists(DEFAULT_TRACES[args.model]):
                args.traces = DEFAULT_TRACES[args.model]  # shipped, read only
                runs = [m for m in methods if args.engine == "reference" or m in VLLM_METHODS]
                check_default_traces(args.traces, args.engine, runs, gens, max(batches + [args.requests]))
            args.trace_model = args.trace_model or FULL_SIZE_TRACES[args.model]
        elif not os.path.isdir(args.model):
            raise ValueError(f"--model {args.model!r}: a checkpoint directory or one of {sorted(FULL_SIZE_TRACES)}")
        if args.engine == "vllm" and not torch.cuda.is_available():
            raise ValueError("--engine vllm needs a CUDA GPU")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from vllm_odb.bench import ceilings

    if torch.cuda.is_available():
        ceilings.CEILINGS.update(ceilings.measure())
    data = {"meta": {}, "rows": [], "steps": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data["meta"].update({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                         "ceilings": dict(ceilings.CEILINGS) or data["meta"].get("ceilings")})
    data["meta"].setdefault("commands", []).append("python -m vllm_odb.bench speed " + " ".join(sys.argv[2:]))
    added = []

    def emit(row: dict, steps: list[dict]) -> None:
        """Each row lands in the file at once: a later crash loses nothing measured."""
        added.append(row)
        data["rows"].append(row)
        data["steps"].extend(steps)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        tqdm.write(json.dumps(row), file=sys.stderr)

    (run_vllm if args.engine == "vllm" else run_reference)(args, methods, gens, batches, emit)
    print(f"{len(added)} rows -> {args.out}", file=sys.stderr)
    return 0
