"""``python -m vllm_odb.bench dynamics``: how a checkpoint decodes, against the published figures.

The speed benchmarks replay what the tiny checkpoints do, so their dynamics have to look like a
real LLaDA or Dream run (research/dynamics.md). For each method this decodes the suite on the
reference engine and reports, from the recorded traces:

- accuracy (the verifier of the checkpoint's suite, tiny/suites.py: final answer and every
  checkable step) and final-answer accuracy;
- ``tokens_per_forward``: response tokens before the end marker / NFE, as the papers count it (NFE
  of the run as the method runs it: fast-dllm decodes the whole canvas); ``tokens_per_forward_es``
  counts forwards up to the block holding the end marker only (what the engine, which stops there,
  pays);
- the response length, forwards per content block (a block holding response tokens), the share of
  a content block its first forward commits (an upper bound on the share passing the threshold:
  one position is committed even when none passes), the share of forwards that commit one token;
- EOS fill: the share of blocks after the answer that one forward completes;
- ALP (``alp`` methods): the canvas left, how often a cut happened and how often it came too early
  (the answer ran into the cut, or the cut fell inside the answer fast-dllm wrote for that prompt);
- jump-share (``jump`` methods, decoded alone: the draft budget of a request alone): drafted tokens
  accepted per forward.

Methods are names of ``vllm_odb.policies.METHODS``, optionally ``@threshold`` (``odb@1.0``) and,
for a jump-share method, ``/rROWS``: its draft budget in query rows (``odb/r96``, ``odb@1.0/r128``;
default ``DecodeConfig.ridge_rows``), so one run compares what fewer draft rows cost in forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from vllm_odb.policies.config import METHODS, DecodeConfig

DEFAULT_METHODS = "vanilla,fast-dllm,odb-alp,odb,odb@1.0"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated METHOD or METHOD@THRESHOLD")
    ap.add_argument("--limit", type=int, default=200, help="suite examples per method")
    ap.add_argument("--jump-limit", type=int, default=100, help="examples for jump-share methods (decoded alone)")
    ap.add_argument("--seed", type=int, default=0, help="suite seed (held out from training)")
    ap.add_argument("--gen-length", type=int, default=512)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", help="write the results as JSON here")


def parse_methods(text: str, threshold: float, gen: int, block: int) -> list[tuple[str, DecodeConfig]]:
    out = []
    for item in (m.strip() for m in text.split(",") if m.strip()):
        spec, _, rows = item.partition("/r")
        name, _, thr = spec.partition("@")
        if name not in METHODS:
            raise ValueError(f"--methods: unknown method {name!r}; choose from {sorted(METHODS)}")
        try:
            t = float(thr) if thr else threshold
        except ValueError:
            raise ValueError(f"--methods: {item!r}: the part after @ is a threshold") from None
        knobs = {"gen_length": gen, "block_length": block}
        if METHODS[name].get("rule") != "quota":
            knobs["threshold"] = t
        if "/r" in item:
            if not rows.isdigit():
                raise ValueError(f"--methods: {item!r}: the part after /r is a draft budget in query rows")
            if not DecodeConfig.for_method(name).jump:
                raise ValueError(f"--methods: {item!r}: /r sets a jump-share method's draft budget; {name} drafts nothing")
            knobs["ridge_rows"] = int(rows)
        out.append((item, DecodeConfig.for_method(name, **knobs)))
    return out


def trace_metrics(records: list[dict], block: int) -> dict:
    """Block-level figures from each record's trace (``commits[b]``: tokens per forward)."""
    first, per_block, singles, forwards, eos_blocks, eos_one, nfe_es = [], [], 0, 0, 0, 0, 0
    for r in records:
        commits = r["trace"]["commits"]
        content = -(-r["response"] // block)  # blocks holding response tokens
        end_block = r["response"] // block  # the block holding the end marker
        for b, steps in enumerate(commits):
            if b < content:
                first.append(steps[0] / block)
                per_block.append(len(steps))
                singles += sum(1 for n in steps if n == 1)
                forwards += len(steps)
            elif b > end_block:
                eos_blocks += 1
                eos_one += len(steps) == 1
            if b <= end_block:
                nfe_es += len(steps)
    return {"first_forward_share": _mean(first), "forwards_per_content_block": _mean(per_block),
            "single_token_forwards": singles / max(1, forwards),
            "eos_blocks_in_one_forward": eos_one / eos_blocks if eos_blocks else None, "nfe_es": nfe_es}


def method_metrics(records: list[dict], cfg: DecodeConfig, reference: dict[int, int] | None) -> dict:
    """Per-method summary. ``reference``: fast-dllm's response length per example index."""
    n = len(records)
    resp = [r["response"] for r in records]
    nfe = sum(r["nfe"] for r in records)
    out = {"requests": n, "accuracy": _share(r["check"]["steps"] for r in records),
           "final_accuracy": _share(r["check"]["final"] for r in records),
           "response_mean": statistics.mean(resp), "response_min": min(resp), "response_max": max(resp),
           "nfe_mean": nfe / n, "tokens_per_forward": sum(resp) / max(1, nfe)}
    tasks = sorted({getattr(r["example"], "task", "") for r in records} - {""})
    if tasks:  # which computations a model has not learnt yet
        out["accuracy_by_task"] = {t: _share(r["check"]["steps"] for r in records if r["example"].task == t)
                                   for t in tasks}
    tm = trace_metrics(records, cfg.block_length)
    out["tokens_per_forward_es"] = sum(resp) / max(1, tm.pop("nfe_es"))
    out.update(tm)
    if cfg.alp:
        kept = [r["canvas_length"] for r in records]
        out["alp_canvas_mean"] = statistics.mean(kept)
        out["alp_cut_share"] = _share(k < cfg.gen_length for k in kept)
        out["alp_truncated_share"] = _share(r["response"] >= r["canvas_length"] for r in records)
        if reference:
            out["alp_cut_inside_fast_dllm_answer"] = _share(
                r["canvas_length"] <= reference[i] for i, r in enumerate(records) if i in reference)
    if cfg.jump:
        out["drafted_per_forward"] = (sum(r["drafted_accepted"] for r in records)
                                      / max(1, sum(r["cached_forwards"] for r in records)))
    return out


def _mean(xs):
    return statistics.mean(xs) if xs else None


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / max(1, len(flags))


def run(args: argparse.Namespace) -> dict:
    from vllm_odb.bench.quality import decode_suite
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny import suites

    methods = parse_methods(args.methods, args.threshold, args.gen_length, args.block_length)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.model, device=device)
    suite = suites.for_checkpoint(args.model).make_suite(args.seed, args.limit)
    results, reference = {}, None
    for name, cfg in methods:
        alone = cfg.jump  # the draft budget is shared by the batch: decode a request alone
        examples = suite[:args.jump_limit] if alone else suite
        records, _ = decode_suite(ckpt, examples, cfg, 1 if alone else args.batch_size, record=True, desc=name)
        results[name] = method_metrics(records, cfg, reference)
        if name == "fast-dllm" and reference is None:
            reference = {i: r["response"] for i, r in enumerate(records)}
        print(json.dumps({name: results[name]}), file=sys.stderr)
        result = {"model": args.model, "seed": args.seed, "gen_length": args.gen_length,
                  "block_length": args.block_length, "threshold": args.threshold, "device": device,
                  "methods": results}
        if args.out:  # each method lands at once: a run stopped later keeps what it measured
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return result


def table(result: dict) -> str:
    """The results as a markdown table, one row per method."""
    cols = [("accuracy", "acc", "{:.1%}"), ("final_accuracy", "final", "{:.1%}"),
            ("tokens_per_forward", "tok/fwd", "{:.2f}"), ("tokens_per_forward_es", "tok/fwd (stop at EOS)", "{:.2f}"),
            ("response_mean", "response", "{:.0f}"), ("forwards_per_content_block", "fwd/block", "{:.1f}"),
            ("first_forward_share", "1st fwd commits", "{:.0%}"), ("eos_blocks_in_one_forward", "EOS blocks in 1 fwd", "{:.0%}"),
            ("alp_canvas_mean", "ALP canvas", "{:.0f}"), ("alp_truncated_share", "ALP cut too early", "{:.1%}"),
            ("drafted_per_forward", "drafts/fwd", "{:.2f}")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in result["methods"].items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = sorted({t for m in result["methods"].values() for t in m.get("accuracy_by_task", {})})
    if tasks:
        lines += ["", "| accuracy by task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for name, m in result["methods"].items():
            by = m.get("accuracy_by_task", {})
            lines.append(f"| {name} | " + " | ".join(f"{by[t]:.0%}" if t in by else "" for t in tasks) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        parse_methods(args.methods, args.threshold, args.gen_length, args.block_length)
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0
