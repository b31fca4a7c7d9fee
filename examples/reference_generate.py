"""Decode a few prompts with each method on a shipped tiny checkpoint and compare the forwards.

    python examples/reference_generate.py [checkpoints/tiny-dream]
"""

import sys

from vllm_odb.policies import DecodeConfig
from vllm_odb.reference.generate import generate, response_ids
from vllm_odb.reference.loader import load_checkpoint

path = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/tiny-llada"
ckpt = load_checkpoint(path)
questions = ["What is 59+63? Show the column sums.", "How many times does c appear in cbbcbac?"]
prompts = [ckpt.encode_chat(q) for q in questions]
for method in ("vanilla", "fast-dllm", "odb"):
    cfg = DecodeConfig.for_method(method, gen_length=128, block_length=32)
    out = generate(ckpt.model, prompts, cfg, ckpt.special)
    answers = [ckpt.tokenizer.decode(response_ids(c, ckpt.special), skip_special_tokens=True) for c in out.tokens]
    print(f"{method:10s} forwards per request {out.nfe}  canvas {out.stats['canvas_length']}  {answers}")
