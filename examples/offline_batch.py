"""Offline batch on vLLM, each request with its own decoding knobs (needs a CUDA GPU).

    python examples/offline_batch.py                      # the shipped tiny LLaDA checkpoint
    python examples/offline_batch.py --model checkpoints/tiny-dream --json

Builds one engine, ``LLM(model, speculative_config={"method": "odb"}, additional_config={"odb":
{"block_length": 32, "ridge_rows": 64}})`` (engine defaults: ODB with adaptive length, early stop
and jump-share drafts), then decodes a batch of prompts in one ``llm.generate`` call where every
request carries its own knobs in ``SamplingParams.extra_args``: the engine default, Fast-dLLM
(drafts off) at thresholds 0.9 and 0.7, ``odb-alp``, ODB at threshold 1.0 and Dynamic-dLLM's
``dynamic-apd``. Prints each answer (and, for prompts from the checkpoint's synthetic suite,
whether the suite's verifier takes it) and the batch's tokens/s; ``--json`` adds one JSON line.

The prompts go in as token ids of the checkpoint's chat template (``TokensPrompt``): a plain
string prompt would be tokenized again with the tokenizer's BOS in front of the template's own.
On CPU, run examples/reference_generate.py (the reference engine) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llada")

# (label, SamplingParams.extra_args): one request each, in turn over the prompts.
PLANS = [
    ("odb (engine default: ALP, early stop, jump-share)", None),
    ("fast-dllm, threshold 0.9 (drafts off)", {"method": "fast-dllm"}),
    ("fast-dllm, threshold 0.7", {"method": "fast-dllm", "threshold": 0.7}),
    ("odb-alp (length prediction, no drafts)", {"method": "odb-alp"}),
    ("odb, threshold 1.0 (one token a step; drafts verified)", {"threshold": 1.0}),
    ("dynamic-apd (adaptive per-token thresholds)", {"method": "dynamic-apd"}),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python examples/offline_batch.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or model name (default: %(default)s)")
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable; default: the "
                    "first prompts of the checkpoint's synthetic suite, one per knob setting)")
    ap.add_argument("--max-tokens", type=int, default=64, help="per request; the canvas is this rounded up to blocks")
    ap.add_argument("--block-length", type=int, default=32, help="the engine's block (fixed per engine)")
    ap.add_argument("--ridge-rows", type=int, default=64, help="jump-share draft budget (engine default 251); "
                    "64 keeps a tiny checkpoint's engine small")
    ap.add_argument("--dtype", default="float32", help="float32 for the tiny checkpoints, bfloat16 for full-size ones")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--kv-cache-memory-bytes", type=int, help="a fixed KV cache instead of a share of the GPU's "
                    "free memory (vLLM's knob; lets several engines start at once on one GPU)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with every request")
    return ap.parse_args(argv)


def prompts_for(args) -> list[tuple[str, object | None]]:
    """(prompt, suite example or None) for each request."""
    if args.prompt:
        return [(p, None) for p in args.prompt]
    from vllm_odb.tiny import suites

    return [(ex.prompt, ex) for ex in suites.for_checkpoint(args.model).make_suite(0, len(PLANS))]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: offline_batch.py runs vLLM and needs a CUDA GPU; on CPU run examples/reference_generate.py",
              file=sys.stderr)
        return 1
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_odb.tiny import suites

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              enforce_eager=args.enforce_eager, speculative_config={"method": "odb"},
              additional_config={"odb": {"block_length": args.block_length, "ridge_rows": args.ridge_rows}})
    tok = llm.get_tokenizer()
    items = prompts_for(args)
    plans = [PLANS[i % len(PLANS)] for i in range(len(items))]
    inputs, params = [], []
    for (prompt, _), (_, knobs) in zip(items, plans):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        inputs.append(TokensPrompt(prompt_token_ids=tok(text, add_special_tokens=False)["input_ids"]))
        params.append(SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=knobs))

    t0 = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    wall = time.perf_counter() - t0

    check = suites.for_checkpoint(args.model).check
    rows = []
    for i, ((prompt, ex), (label, knobs), out) in enumerate(zip(items, plans, outputs)):
        answer, n = out.outputs[0].text, len(out.outputs[0].token_ids)
        right = None if ex is None else bool(check(answer, ex)["steps"])
        verdict = "" if ex is None else ("  right" if right else f"  wrong (expected {ex.answer!r})")
        print(f"[{i}] {label}\n    extra_args={json.dumps(knobs)}\n    > {prompt}\n    {answer!r}  "
              f"({n} tokens){verdict}")
        rows.append({"label": label, "extra_args": knobs, "prompt": prompt, "answer": answer, "tokens": n,
                     "right": right})
    tokens = sum(r["tokens"] for r in rows)
    print(f"{len(rows)} requests in one batch: {tokens} tokens in {wall:.2f} s, {tokens / wall:.1f} tokens/s")
    if args.json:
        print(json.dumps({"model": args.model, "requests": rows, "tokens": tokens, "wall_s": round(wall, 4),
                          "tokens_per_s": tokens / wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
