"""``python -m vllm_odb.bench traces``: record a trained checkpoint's decoding dynamics for replay.

The speed benchmarks time full-size random-weight models, which are never confident, by forcing
onto them what a trained checkpoint did (bench/replay.py). This records, for every benchmark
method and gen length, one trace per suite prompt (``SUITE_SEED``, held out from training):
tokens committed by each forward of each block, the canvas each refresh left, the last block.

- ``reference`` traces decode as the method runs on the reference engine (fast-dllm: the whole
  canvas, as the research code does); ``vllm`` traces stop after the block holding the end
  marker, where the vLLM engine stops a request. Methods that stop early anyway record once.
- Requests are decoded in batches (a request decodes the same alone and in a batch), except
  jump-share methods: their draft budget is shared by the batch, so each request is decoded alone,
  as a batch-1 request of the benchmark would be; its accepted drafts are the checkpoint's own.
- vanilla (one token per forward, whatever the model) records only ``--vanilla-requests``.

The file (keys ``method|gen_length|engine``) is what ``bench speed --traces`` reads; the shipped
ones, ``benchmarks/traces/tiny-{llada,dream}.json``, are its defaults for the full-size models.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from vllm_odb.bench.speed import BENCH_METHODS, SUITE_SEED, _ints, _trace_key, method_config

ENGINES = ("reference", "vllm")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="trained checkpoint directory")
    ap.add_argument("--methods", default=",".join(BENCH_METHODS))
    ap.add_argument("--gen-lengths", default="256,512,1024")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--requests", type=int, default=64, help="traces per method and gen length")
    ap.add_argument("--vanilla-requests", type=int, default=4)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--ridge-rows", type=int, help="jump-share draft budget (default: the method's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", required=True)


def record(ckpt, prompts: list[list[int]], cfg, batch_size: int) -> list[dict]:
    """One trace per prompt: ``{prompt_len, response_tokens, replay}``."""
    from vllm_odb.bench.replay import generate_traced
    from vllm_odb.reference.generate import response_ids

    size = 1 if cfg.jump else batch_size
    rows = []
    for i in range(0, len(prompts), size):
        chunk = prompts[i:i + size]
        out = generate_traced(ckpt.model, chunk, cfg, ckpt.special, record=True)
        for p, canvas, trace in zip(chunk, out.tokens, out.stats["trace"]):
            rows.append({"prompt_len": len(p), "response_tokens": len(response_ids(canvas, ckpt.special)),
                         "replay": trace})
    return rows


def run(args: argparse.Namespace) -> dict:
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny import suites

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [m for m in methods if m not in BENCH_METHODS] + [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown method(s) or engine(s) {unknown}; methods: {list(BENCH_METHODS)}, "
                         f"engines: {list(ENGINES)}")
    gens = _ints(args.gen_lengths, "gen-lengths")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.model, device=device)
    prompts = [ckpt.encode_chat(e.prompt) for e in suites.for_checkpoint(args.model).make_suite(SUITE_SEED, args.requests)]
    traces: dict[str, list[dict]] = {}
    jobs = [(m, g) for m in methods for g in gens]
    for m, g in tqdm(jobs, desc=f"traces of {args.model}", file=sys.stderr):
        n = args.vanilla_requests if m == "vanilla" else args.requests
        recorded: dict = {}  # a method that stops early anyway decodes alike on both engines: once
        for e in engines:
            cfg = method_config(m, g, args)
            cfg = cfg.replace(early_stop=True) if e == "vllm" else cfg
            if cfg not in recorded:
                recorded[cfg] = record(ckpt, prompts[:n], cfg, args.batch_size)
            traces[_trace_key(m, g, e)] = recorded[cfg]
    return {"trace_model": args.model, "suite_seed": SUITE_SEED, "threshold": args.threshold,
            "block_length": args.block_length, "traces": traces}


def main(args: argparse.Namespace) -> int:
    try:
        data = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"{sum(map(len, data['traces'].values()))} traces -> {args.out}", file=sys.stderr)
    return 0
