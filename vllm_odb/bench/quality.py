"""``python -m vllm_odb.bench quality``: accuracy of a decoding method on the synthetic suite.

Answers are scored by the verifier of the suite the checkpoint was trained on (tiny/suites.py): ``accuracy`` counts answers
whose final answer and every checkable step are right, ``final_accuracy`` the final answer alone.
Prints one JSON object on the last line of stdout (with ``--json``) holding at least
``accuracy``, ``nfe``, ``generated_tokens``, ``wall_s`` and per-task accuracy; a progress bar on
stderr. The prompts come from ``--seed`` (the checkpoints were trained on other seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from vllm_odb.errors import USER_ERRORS, cli_error
from vllm_odb.policies.config import METHODS, DecodeConfig

ENGINES = ("reference",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ChoiceError(ValueError):
    pass


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="checkpoint directory (official LLaDA or Dream layout)")
    ap.add_argument("--method", required=True, help=f"one of {sorted(METHODS)}")
    ap.add_argument("--engine", default="reference", help=f"one of {list(ENGINES)}")
    ap.add_argument("--limit", type=int, default=100, help="number of suite examples")
    ap.add_argument("--seed", type=int, default=0, help="suite seed (prompts are generated from it)")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--factor", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cache", default=None, help="none, prefix or dual (method default otherwise)")
    ap.add_argument("--rule", default=None, help="override the method's commit rule")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--alp-threshold", type=float, default=None, help="ODB length prediction confidence")
    ap.add_argument("--alp-min-length", type=int, default=None)
    ap.add_argument("--ridge-rows", type=int, default=None, help="jump-share draft budget (query rows per forward)")
    ap.add_argument("--max-draft-positions", type=int, default=None)
    ap.add_argument("--suffix-window", type=int, default=None, help="Streaming-dLLM suffix window (0 = no pruning)")
    ap.add_argument("--threshold-alpha", type=float, default=None, help="Streaming-dLLM dynamic threshold strength")
    ap.add_argument("--apd-alpha", type=float, default=None, help="Dynamic-dLLM APD concentration weight")
    ap.add_argument("--apd-beta", type=float, default=None, help="Dynamic-dLLM APD instability weight")
    ap.add_argument("--apd-min", type=float, default=None, help="floor of the APD thresholds")
    ap.add_argument("--dcu-layer-budget", type=int, default=None, help="Dynamic-dLLM DCU tokens per layer")
    ap.add_argument("--dcu-window", type=int, default=None, help="DCU forced window around the last commit")
    ap.add_argument("--dcu-prompt-interval", type=int, default=None, help="DCU prompt refresh period (0 = never)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help=f"one of {list(DTYPES)}")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")


def decode_suite(ckpt, suite, cfg: DecodeConfig, batch_size: int, generator=None, record: bool = False,
                 desc: str = "", check=None) -> tuple[list[dict], int]:
    """Decode ``suite`` with ``cfg`` in batches on the reference engine. Returns one record per
    example (its response text and length, NFE, the verifier's ``check`` (default: that of the
    checkpoint's suite), the per-request stats of ``generate``, with ``record`` its trace) and
    the batches' forwards."""
    from tqdm import tqdm

    from vllm_odb.bench.replay import generate_traced
    from vllm_odb.reference.generate import response_ids
    from vllm_odb.tiny import suites

    check = check or suites.for_checkpoint(ckpt.path).check

    records, forwards = [], 0
    bar = tqdm(total=len(suite), desc=desc, file=sys.stderr, unit="prompt")
    for i in range(0, len(suite), batch_size):
        chunk = suite[i:i + batch_size]
        out = generate_traced(ckpt.model, [ckpt.encode_chat(e.prompt) for e in chunk], cfg, ckpt.special,
                              generator=generator, record=record)
        forwards += out.forwards
        for j, (ex, canvas, nfe) in enumerate(zip(chunk, out.tokens, out.nfe)):
            resp = response_ids(canvas, ckpt.special)
            text = ckpt.tokenizer.decode(resp, skip_special_tokens=True)
            records.append({"example": ex, "text": text, "response": len(resp), "nfe": nfe,
                            "check": check(text, ex), **{k: v[j] for k, v in out.stats.items()}})
        bar.update(len(chunk))
    bar.close()
    return records, forwards


def quality_config(args: argparse.Namespace) -> DecodeConfig:
    if args.engine not in ENGINES:
        raise ChoiceError(f"unknown engine {args.engine!r}; choose from {list(ENGINES)}")
    if args.method not in METHODS:
        raise ChoiceError(f"unknown method {args.method!r}; choose from {sorted(METHODS)}")
    if args.dtype not in DTYPES:
        raise ChoiceError(f"unknown dtype {args.dtype!r}; choose from {list(DTYPES)}")
    return DecodeConfig.for_method(
        args.method, gen_length=args.gen_length, block_length=args.block_length, threshold=args.threshold,
        factor=args.factor, steps=args.steps, cache=args.cache, rule=args.rule, temperature=args.temperature,
        alp_threshold=args.alp_threshold, alp_min_length=args.alp_min_length, ridge_rows=args.ridge_rows,
        max_draft_positions=args.max_draft_positions, suffix_window=args.suffix_window,
        threshold_alpha=args.threshold_alpha, apd_alpha=args.apd_alpha, apd_beta=args.apd_beta, apd_min=args.apd_min,
        dcu_layer_budget=args.dcu_layer_budget, dcu_window=args.dcu_window, dcu_prompt_interval=args.dcu_prompt_interval)


def run_quality(args: argparse.Namespace) -> dict:
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny import suites

    cfg = quality_config(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.model, dtype=DTYPES[args.dtype], device=device)
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    suite = suites.for_checkpoint(args.model).make_suite(args.seed, args.limit, tasks)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    records, forwards = decode_suite(ckpt, suite, cfg, args.batch_size, gen, desc=f"{args.method} {args.engine}")
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t0
    n = len(suite)
    per_task = defaultdict(list)
    for r in records:
        per_task[r["example"].task].append(r["check"]["steps"])
    total = lambda key: sum(r[key] for r in records)  # noqa: E731
    nfe = total("nfe")
    return {
        "model": args.model, "method": args.method, "engine": args.engine, "seed": args.seed, "limit": n,
        "gen_length": cfg.gen_length, "block_length": cfg.block_length, "rule": cfg.rule, "cache": cfg.cache,
        "threshold": cfg.threshold if cfg.rule in ("threshold", "adaptive") else None, "dtype": args.dtype,
        "device": device, "suffix_window": cfg.suffix_window or None, "threshold_alpha": cfg.threshold_alpha,
        "apd": [cfg.apd_alpha, cfg.apd_beta, cfg.apd_min] if cfg.rule == "adaptive" else None,
        "dcu": [cfg.dcu_layer_budget, cfg.dcu_window, cfg.dcu_prompt_interval] if cfg.dcu else None,
        "alp": cfg.alp, "early_stop": cfg.early_stop, "jump": cfg.jump, "ridge_rows": cfg.ridge_rows if cfg.jump else None,
        "accuracy": sum(r["check"]["steps"] for r in records) / n,
        "final_accuracy": sum(r["check"]["final"] for r in records) / n,
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        "nfe": nfe / n, "forwards": forwards, "generated_tokens": total("response"),
        "tokens_per_forward": total("response") / max(1, nfe),
        "refresh_tokens": total("refresh_tokens") / n,
        "predicted_length": total("canvas_length") / n,
        "actual_length": sum(min(r["response"] + 1, cfg.gen_length) for r in records) / n,  # + the end marker
        "drafted_per_forward": total("drafted_accepted") / max(1, total("cached_forwards")),
        "query_rows_per_forward": total("query_rows") / max(1, total("cached_forwards")),
        "dcu_recompute_fraction": total("dcu_recomputed") / total("dcu_dense") if cfg.dcu else None,
        "wall_s": round(wall, 3),
        "samples": [{"task": r["example"].task, "prompt": r["example"].prompt, "answer": r["example"].answer,
                     "output": r["text"]} for r in records[:5]],
    }


def main(args: argparse.Namespace) -> int:
    try:
        result = run_quality(args)
    except USER_ERRORS as e:  # ChoiceError, ODBError (the checkpoint), DecodeConfig's ValueError
        return cli_error(e)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"accuracy {result['accuracy']:.3f}  nfe {result['nfe']:.1f}  wall {result['wall_s']}s")
        for t, a in result["per_task"].items():
            print(f"  {t:8s} {a:.3f}")
    return 0
