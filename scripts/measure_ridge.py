"""Measure the GPU's ceilings and the draft budget's ridge point (query rows per forward).

    python scripts/measure_ridge.py [--json out.json]

Peak bf16 matmul FLOP/s (a large square GEMM) over device-to-device copy bandwidth (read + write
of a large buffer) is the ridge point in FLOP/byte. A bf16 GEMM of N token rows against a d x d
weight does 2*N*d*d FLOPs over about 2*d*d weight bytes, so its arithmetic intensity is about N:
the ridge point is also the number of query rows a forward can carry before it stops being
memory bound. That is ``DecodeConfig.ridge_rows``.
"""

import argparse
import json

import torch


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n ** 3 / timed(lambda: a @ b, 50)
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src), 20)
    result = {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": round(flops / 1e12, 1),
              "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "ridge_flop_per_byte": round(flops / bandwidth, 1),
              "ridge_rows": int(flops / bandwidth)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
