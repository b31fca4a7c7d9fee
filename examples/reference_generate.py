"""Decode a few prompts with each method on the reference engine (pure PyTorch, CPU is fine) and
compare the forwards.

    python examples/reference_generate.py                     # the shipped tiny LLaDA checkpoint
    python examples/reference_generate.py --model checkpoints/tiny-dream

For each of ``vanilla``, ``fast-dllm`` and ``odb``: the answers, the forwards per request (NFE)
and the canvas ALP left. No vLLM and no GPU needed (it uses one when there is one).
"""

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llada")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python examples/reference_generate.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: %(default)s)")
    ap.add_argument("--gen-length", type=int, default=None,
                    help="canvas length (default: one the checkpoint's suite answers end in)")
    ap.add_argument("--block-length", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    from vllm_odb.policies import DecodeConfig
    from vllm_odb.reference.generate import generate, response_ids
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny.suites import showcase

    try:
        ckpt = load_checkpoint(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    questions, canvas = showcase(args.model)  # two questions of the suite the checkpoint was trained on
    prompts = [ckpt.encode_chat(q) for q in questions[:2]]
    gen = canvas if args.gen_length is None else args.gen_length
    for method in ("vanilla", "fast-dllm", "odb"):
        cfg = DecodeConfig.for_method(method, gen_length=gen, block_length=args.block_length)
        out = generate(ckpt.model, prompts, cfg, ckpt.special)
        answers = [ckpt.tokenizer.decode(response_ids(c, ckpt.special), skip_special_tokens=True) for c in out.tokens]
        print(f"{method:10s} forwards per request {out.nfe}  canvas {out.stats['canvas_length']}  {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
