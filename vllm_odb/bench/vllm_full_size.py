"""``python -m vllm_odb.bench vllm-full-size``: full-size LLaDA-8B / Dream-7B (random weights) on the
vLLM engine, per-step cost vs the GPU's ceilings.

    python -m vllm_odb.bench vllm-full-size --model llada-8b --out full-llada.json

Weights are vLLM's ``load_format="dummy"`` (random, made on the GPU; never shipped), so the
model is never confident: every step commits one token, which is exactly what a per-step cost
measurement wants. Measures, in this run: the ceilings (bf16 matmul, device copy), then for
batch 1 and ``--batch``: the engine's decode step (wall time of a decode-only engine step,
scheduling included) against the weight-streaming floor (weight bytes / copy bandwidth), and the
refresh forward against the bf16 peak (achieved FLOP/s). Step times come from the engine's step
profiler (bench/profile.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import tempfile
import time


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=("llada-8b", "dream-7b"), required=True)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    faulthandler.dump_traceback_later(560, exit=True)

    import torch

    from vllm_odb.bench.ceilings import measure
    from vllm_odb.bench.costs import forward_flops, weight_bytes
    from vllm_odb.bench.full_size import FULL_SIZE, write_config_dir
    from vllm_odb.checkpoint import ModelSpec

    ceilings = measure()
    spec = ModelSpec.from_config(FULL_SIZE[args.model]())
    path = write_config_dir(args.model, tempfile.mkdtemp(prefix=args.model))
    profile = os.path.join(tempfile.mkdtemp(), "steps.jsonl")
    from vllm_odb.engine import PROFILE_ENV

    os.environ[PROFILE_ENV] = profile  # the engine's step profiler (bench/profile.py)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=path, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.prompt_len + args.gen_length + 64, gpu_memory_utilization=0.85,
              max_num_seqs=max(8, args.batch), enforce_eager=args.eager, seed=0,
              additional_config={"odb": {"block_length": args.block_length, "gen_length": args.gen_length}})
    init_s = time.time() - t0
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_tokens=args.gen_length, ignore_eos=True)
    floor_s = weight_bytes(spec) / (ceilings["copy_bandwidth_gbs"] * 1e9)
    peak = ceilings["bf16_matmul_tflops"] * 1e12
    rows = []
    for batch in (1, args.batch):
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(0, spec.mask_token_id - 1, (args.prompt_len,),
                                                               generator=g).tolist()) for _ in range(batch)]
        llm.generate(prompts[:1], sp, use_tqdm=False)  # warm this shape
        open(profile, "w").close()
        t0 = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.time() - t0
        steps = [json.loads(x) for x in open(profile)]
        decode = [s["step_s"] for s in steps if s["step_s"] and s["refresh_reqs"] == 0 and s["decode_reqs"] == batch]
        refresh = [s for s in steps if s["refresh_reqs"] == batch and s["decode_reqs"] == batch]
        refresh_s = statistics.median(s["refresh_s"] for s in refresh) if refresh else None
        refresh_tokens = refresh[0]["refresh_tokens"] if refresh else None
        per_req_tokens = refresh_tokens // batch if refresh_tokens else None
        row = {
            "batch": batch, "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "wall_s": round(wall, 3),
            "engine_steps": len(steps), "decode_steps": len(decode),
            "decode_step_ms_p50": round(1e3 * statistics.median(decode), 3) if decode else None,
            "weight_stream_floor_ms": round(1e3 * floor_s, 3),
            "decode_step_over_floor": round(statistics.median(decode) / floor_s, 3) if decode else None,
            "refresh_ms_p50": round(1e3 * refresh_s, 3) if refresh_s else None,
            "refresh_tokens_per_req": per_req_tokens,
        }
        if refresh_s:
            flops = batch * forward_flops(spec, per_req_tokens)
            row["refresh_tflops"] = round(flops / refresh_s / 1e12, 1)
            row["refresh_fraction_of_peak"] = round(flops / refresh_s / peak, 3)
        rows.append(row)
    result = {"model": args.model, "weights": "random (load_format=dummy)", "dtype": "bfloat16",
              "mode": "eager" if args.eager else "cuda graphs", "prompt_len": args.prompt_len,
              "gen_length": args.gen_length, "block_length": args.block_length, "init_s": round(init_s, 1),
              "weight_gb": round(weight_bytes(spec) / 1e9, 2), "ceilings": ceilings, "rows": rows}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0

