"""``python -m vllm_odb.bench vllm-parity``: token parity of the vLLM engine with the reference loop,
same decoding mode, on a shipped tiny checkpoint (needs a GPU).

    python -m vllm_odb.bench vllm-parity --model checkpoints/tiny-llada --mode eager --out parity.json
    python -m vllm_odb.bench vllm-parity --model checkpoints/tiny-dream --method odb --select speculative

``--method``: the reference loop's method; the engine gets the same knobs through
``additional_config`` or (``--select speculative``, odb methods) ``speculative_config={"method": "odb"}``.
Also compares NFE: the engine's ``vllm_odb:forwards`` counter over the alone runs against the
reference loop's summed NFE.

Decodes ``--n`` suite prompts (mixed tasks, so mixed prompt lengths) greedily with
``LLM(...).generate`` (every prompt alone, then all in one batch) and with the reference loop
(each alone), and compares the responses token for token (up to the first end-of-sequence id,
where vLLM stops). Prints one JSON summary line; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import time

import torch

from vllm_odb.bench.serving import memory_kwargs

METHODS = ("fast-dllm", "odb-alp", "odb-jump", "odb", "dynamic-apd", "odb-streaming")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=("eager", "graphs"), default="eager")
    ap.add_argument("--gpu-memory", type=float, default=0.4,
                    help="vLLM's gpu_memory_utilization (lower it to run several checks on one GPU at once)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--ridge-rows", type=int, default=None,
                    help="draft budget (jump-share); also sets a jump-share engine's canvas width")
    ap.add_argument("--method", choices=METHODS, default="fast-dllm")
    ap.add_argument("--threshold-alpha", type=float, default=None,
                    help="Streaming-dLLM's dynamic threshold (threshold_alpha) on top of --method")
    ap.add_argument("--suffix-window", type=int, default=None,
                    help="Streaming-dLLM's suffix pruning (suffix_window) on top of --method")
    ap.add_argument("--select", choices=("additional", "speculative"), default="additional",
                    help="how the engine is told the method")
    ap.add_argument("--attention-backend", default=None,
                    help="vLLM attention backend (default: the plugin's: FLASH_ATTN for bf16/fp16 on Hopper, "
                         "else TRITON_ATTN)")
    ap.add_argument("--flash-attn-version", type=int, choices=(3, 4), default=None,
                    help="pin FlashAttention's version (attention_config.flash_attn_version)")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    faulthandler.dump_traceback_later(500, exit=True)
    from vllm_odb.policies import DecodeConfig

    cfg = DecodeConfig.for_method(args.method, gen_length=args.gen_length, block_length=args.block_length,
                                  threshold=args.threshold, ridge_rows=args.ridge_rows, **_streaming(args))
    prompts, ref, end_ids = _reference(args, cfg)
    rows, counted, seconds, resolved = _vllm(args, prompts, end_ids)
    summary = {
        "model": args.model, "mode": args.mode, "dtype": args.dtype, "n": args.n, "tp": args.tp,
        "attention_backend": args.attention_backend or "default", "flash_attn_version": args.flash_attn_version,
        "attention_resolved": resolved, "counts_required": getattr(torch, args.dtype) is torch.float32,
        "method": args.method, "select": args.select, **_streaming(args),
        "nfe": {"reference": ref["nfe"], "vllm": counted["forwards"], "vllm_idle_forwards": counted["idle_forwards"]},
        "canvas": {"reference": ref["canvas"], "vllm": counted["canvas_predicted"]},
        "drafts_accepted": {"reference": ref["drafted"], "vllm": counted["drafts_accepted"]},
        # refresh tokens whose forwards replayed CUDA graphs (engine/model_state.py PagedRefresh)
        "refresh_graph_tokens": {"vllm": counted["refresh_graph_tokens"], "of": counted["refresh_tokens"]},
        "gen_length": args.gen_length, "block_length": args.block_length, "threshold": args.threshold,
        "alone_match": 0, "batched_match": 0, "prompt_lens": sorted({len(p) for p in prompts}),
        "seconds": {"reference": ref["seconds"], **seconds},
    }
    for row, r in zip(rows, ref["responses"]):
        row.update(ref=r, alone_match=row["alone"] == r, batched_match=row["batched"] == r)
        summary["alone_match"] += row["alone_match"]
        summary["batched_match"] += row["batched_match"]
    # where a response leaves the reference (bf16 runs differ in rounding, so a flip of two close
    # confidences can change the rest of a response): the share of reference tokens before it
    summary["alone_prefix_share"] = prefix_share([x["alone"] for x in rows], ref["responses"])
    summary["batched_prefix_share"] = prefix_share([x["batched"] for x in rows], ref["responses"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    print(json.dumps(summary))
    ok = verdict(summary, args.n, cfg.jump)
    if not ok:
        for x in rows:
            if not (x["alone_match"] and x["batched_match"]):
                print("MISMATCH", json.dumps(x))
    return 0 if ok else 1


def verdict(summary: dict, n: int, jump: bool) -> bool:
    """Whether a parity run passes. Every prompt alone must equal the reference; batched too, but
    on jump-share, whose draft budget is shared by the live batch (ridge_rows // requests), so a
    batched engine drafts fewer positions than a request alone: there batched tokens are reported,
    not required. In fp32 the engine and the reference decide alike, forward for forward, so NFE,
    canvas and accepted drafts must match. In bf16 the kernels round differently and a confidence at
    the threshold can flip, moving a commit or a draft's acceptance by a forward: the counts are
    reported, not required (``counts_required``)."""
    counts_equal = all(summary[k]["reference"] == summary[k]["vllm"] for k in ("nfe", "canvas", "drafts_accepted"))
    if not counts_equal and not summary["counts_required"]:
        print(f"note: NFE / canvas / drafts differ from the reference in {summary['dtype']} (reported, not required)")
    return (summary["alone_match"] == n and (jump or summary["batched_match"] == n)
            and (counts_equal or not summary["counts_required"]))


def prefix_share(got: list[list[int]], ref: list[list[int]]) -> float:
    """The reference's tokens that each response repeats before its first difference, over all of
    the reference's tokens (1.0: every response begins with its reference; a response that runs on
    past its reference's end also scores 1.0, so ``alone_match``/``batched_match`` say equality)."""
    total = sum(max(len(r), 1) for r in ref)
    same = 0
    for g, r in zip(got, ref):
        n = 0
        while n < min(len(g), len(r)) and g[n] == r[n]:
            n += 1
        same += n if (r or g) else 1
    return round(same / total, 4)


def _reference(args, cfg):
    """The reference loop on every prompt alone: responses, and NFE, canvas and drafts summed."""
    from vllm_odb.reference.generate import generate, response_ids
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny.suite import make_suite

    ck = load_checkpoint(args.model, dtype=getattr(torch, args.dtype), device="cuda")
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(args.seed, args.n)]
    t0 = time.time()
    outs = [generate(ck.model, [p], cfg, ck.special) for p in prompts]
    # vLLM ends a request at the block that emits its EOS, which is early termination: its NFE is
    # the reference's with early_stop (the same tokens up to the end marker).
    nfe_outs = outs if cfg.early_stop else [generate(ck.model, [p], cfg.replace(early_stop=True), ck.special)
                                            for p in prompts]
    ref = {"responses": [response_ids(o.tokens[0], ck.special) for o in outs],
           "nfe": sum(o.nfe[0] for o in nfe_outs), "canvas": sum(o.stats["canvas_length"][0] for o in outs),
           "drafted": sum(o.stats["drafted_accepted"][0] for o in outs), "seconds": round(time.time() - t0, 2)}
    end_ids = set(ck.special.end_ids)
    del ck
    torch.cuda.empty_cache()
    return prompts, ref, end_ids


def _vllm(args, prompts, end_ids):
    """vLLM on every prompt alone, then all in one batch: each row's responses, the engine's
    counters over the alone runs, the times, and the engine's attention backend and FA pin."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_odb.engine.metrics import snapshot

    t0 = time.time()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, **memory_kwargs(args.gpu_memory),
              max_num_seqs=max(16, args.n), enforce_eager=args.mode == "eager", seed=0,
              tensor_parallel_size=args.tp, disable_custom_all_reduce=args.tp > 1, **engine_method(args),
              **({"attention_backend": args.attention_backend} if args.attention_backend else {}),
              **({"attention_config": {"flash_attn_version": args.flash_attn_version}}
                 if args.flash_attn_version else {}))
    seconds = {"vllm_init": round(time.time() - t0, 2)}
    ac = llm.llm_engine.vllm_config.attention_config  # as the config hook resolved it
    resolved = {"backend": ac.backend.name if ac.backend is not None else None,
                "flash_attn_version": ac.flash_attn_version}
    sp = SamplingParams(temperature=0.0, max_tokens=args.gen_length)

    def cut(ids):
        for i, t in enumerate(ids):
            if t in end_ids:
                return list(ids[:i])
        return list(ids)

    before = snapshot()
    t0 = time.time()
    alone = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    seconds["vllm_alone"] = round(time.time() - t0, 2)
    after = snapshot()
    t0 = time.time()
    batched = [o.outputs[0].token_ids for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                                                            use_tqdm=False)]
    seconds["vllm_batch"] = round(time.time() - t0, 2)
    rows = [{"i": i, "prompt_len": len(p), "alone": cut(a), "batched": cut(b)}
            for i, (p, a, b) in enumerate(zip(prompts, alone, batched))]
    return rows, {k: after[k] - before[k] for k in after}, seconds, resolved


def _streaming(args) -> dict:
    """The Streaming-dLLM knobs given on the command line."""
    knobs = {"threshold_alpha": args.threshold_alpha, "suffix_window": args.suffix_window}
    return {k: v for k, v in knobs.items() if v is not None}


def engine_method(args) -> dict:
    """LLM(...) keyword arguments that select ``args.method`` on the engine."""
    section = {"block_length": args.block_length, "gen_length": args.gen_length, "threshold": args.threshold,
               **_streaming(args)}
    if args.ridge_rows is not None:
        section["ridge_rows"] = args.ridge_rows
    if args.select == "speculative":
        if args.method != "odb":
            raise SystemExit("--select speculative selects the odb method")
        return {"additional_config": {"odb": section}, "speculative_config": {"method": "odb"}}
    return {"additional_config": {"odb": {**section, "method": args.method}}}
