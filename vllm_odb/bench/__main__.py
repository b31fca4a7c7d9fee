"""``python -m vllm_odb.bench {quality} ...``"""

from __future__ import annotations

import argparse
import sys

from vllm_odb.bench import quality


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_odb.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    quality.add_arguments(sub.add_parser("quality", help="exact match on the synthetic suite"))
    args = ap.parse_args(argv)
    return quality.main(args)


if __name__ == "__main__":
    sys.exit(main())
