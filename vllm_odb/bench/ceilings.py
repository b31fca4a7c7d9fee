"""The GPU's measured ceilings: bf16 matmul FLOP/s and device-to-device copy bandwidth.

Their ratio is the ridge point (FLOP/byte), which is also the number of query rows a forward can
carry before it stops being memory bound (``DecodeConfig.ridge_rows``); the copy bandwidth over
the weight bytes is the floor of a memory-bound decode step.

``python -m vllm_odb.bench measure-ridge [--json out.json]`` measures them: peak bf16 matmul
FLOP/s (a large square GEMM) over device-to-device copy bandwidth (read + write of a large buffer)
is the ridge point in FLOP/byte. A bf16 GEMM of N token rows against a d x d weight does 2*N*d*d
FLOPs over about 2*d*d weight bytes, so its arithmetic intensity is about N: the ridge point is
also the number of query rows a forward can carry before it stops being memory bound.
"""

from __future__ import annotations

import argparse
import json

import torch

CEILINGS: dict = {}  # this run's measured ceilings (filled by the benchmarks that measure them)


def timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _matmul_flops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / timed(lambda: a @ b, 50)


def _copy_bandwidth(nbytes: int = 2 ** 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), 20)  # read + write


def measure() -> dict:
    flops, bandwidth = _matmul_flops(), _copy_bandwidth()
    torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": round(flops / 1e12, 1),
            "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "ridge_flop_per_byte": round(flops / bandwidth, 1),
            "ridge_rows": int(flops / bandwidth)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", default=None, help="also write the result to this file")


def main(args: argparse.Namespace) -> int:
    """``measure-ridge``: print the ceilings and the ridge point as one JSON line."""
    result = measure()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
