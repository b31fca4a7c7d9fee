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

from vllm_odb.bench.ceilings import measure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = measure()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
