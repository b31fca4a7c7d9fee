"""``python -m vllm_odb.generate``: answer prompts with a dLLM checkpoint.

    python -m vllm_odb.generate --model checkpoints/tiny-llada "What is 47+38? Show the column sums."

Runs the reference engine (pure PyTorch, CPU or GPU) on all prompts as one batch. Prints each
prompt, its answer and a line of decoding figures: the answer's tokens, the forwards that decoded
it, tokens per forward, its tokens per second of the batch's wall time, and the method; then the
batch's totals. ``--json`` prints one JSON object per prompt instead (every per-request statistic
of the decoder, e.g. the canvas after adaptive length prediction and the drafted tokens accepted).

Bad input is one line on stderr, ``error: ...``, and exit status 2: a directory that is not a
checkpoint or whose weights are missing, truncated or of other sizes than its config.json, a
malformed JSON file, an empty prompt, a knob the method ignores (``--method vanilla --threshold``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vllm_odb.errors import USER_ERRORS, ODBError, cli_error
from vllm_odb.policies.config import METHODS, DecodeConfig


def check_prompts(prompts: list[str], stops: list[str]) -> None:
    """An empty prompt would decode to noise, an empty stop string would end every answer at once:
    both are refused, naming the one at fault."""
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise ODBError(f"prompt {i} of {len(prompts)} ({p!r}) is empty: a diffusion LM would decode noise "
                           "from it; pass the text to answer")
    for s in stops:
        if not s:
            raise ODBError("--stop '' is empty: a stop string must hold some text")


def _figures(tokens: int, nfe: int, wall: float, method: str) -> str:
    return " · ".join([f"tokens {tokens}", f"forwards {nfe}", f"{tokens / max(1, nfe):.1f} tok/forward",
                       f"{tokens / max(wall, 1e-9):.0f} tok/s", f"method {method}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_odb.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="*", help="user messages (default: three questions of the suite the "
                                               "checkpoint was trained on)")
    ap.add_argument("--model", default="checkpoints/tiny-llada")
    ap.add_argument("--method", default="odb", help=f"one of {sorted(METHODS)}")
    ap.add_argument("--gen-length", type=int, default=None,
                    help="canvas length (default: one the checkpoint's suite answers end in: 128 or 512)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=None, help="commit threshold (threshold and adaptive rules)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt (text and every statistic)")
    args = ap.parse_args(argv)
    from vllm_odb.reference.generate import generate, response_ids
    from vllm_odb.reference.loader import load_checkpoint

    from vllm_odb.tiny.suites import showcase

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        questions, canvas = showcase(args.model)  # a log naming an unknown suite: one line, exit 2
        prompts = args.prompts or list(questions)
        if args.gen_length is None:
            args.gen_length = canvas
        check_prompts(prompts, args.stop)
        cfg = DecodeConfig.for_method(args.method, gen_length=args.gen_length, block_length=args.block_length,
                                      threshold=args.threshold)
        ckpt = load_checkpoint(args.model, device=device)
        stop = [ckpt.tokenizer(s, add_special_tokens=False)["input_ids"] for s in args.stop]
        if sys.stderr.isatty():  # one batched call, no per-prompt progress to show: say what runs
            print(f"decoding {len(prompts)} prompt(s), method {args.method}, on {device} ...", file=sys.stderr)
        t0 = time.time()
        out = generate(ckpt.model, [ckpt.encode_chat(p) for p in prompts], cfg, ckpt.special, stop=stop)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.time() - t0
    except USER_ERRORS as e:
        return cli_error(e)
    total = 0
    for i, (p, canvas) in enumerate(zip(prompts, out.tokens)):
        ids = response_ids(canvas, ckpt.special)
        text = ckpt.tokenizer.decode(ids, skip_special_tokens=True)
        for s in args.stop:
            text = text.split(s)[0]
        total += len(ids)
        stats = {k: v[i] for k, v in out.stats.items()}
        if args.json:
            print(json.dumps({"prompt": p, "text": text, "tokens": len(ids), "nfe": out.nfe[i], **stats,
                              "wall_s": round(wall, 3), "method": args.method}))
        else:
            print(f"> {p}\n{text}\n  {_figures(len(ids), out.nfe[i], wall, args.method)}\n")
    if not args.json:
        print(f"total: {len(prompts)} prompt{'s' * (len(prompts) > 1)} in one batch · tokens {total} · "
              f"forwards {out.forwards} · {wall:.2f} s · {total / max(wall, 1e-9):.0f} tok/s · "
              f"method {args.method} on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
