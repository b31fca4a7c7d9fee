"""``python -m vllm_odb.bench {quality,speed,report} ...``"""

from __future__ import annotations

import argparse
import sys

from vllm_odb.bench import dcu_cost, quality, report, speed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_odb.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    quality.add_arguments(sub.add_parser("quality", help="exact match on the synthetic suite"))
    speed.add_arguments(sub.add_parser("speed", help="tokens/s, latency, NFE and step cost per method and engine "
                                       "(full-size configs by trace replay)"))
    report.add_arguments(sub.add_parser("report", help="speed results JSON -> markdown summary and PNG plots"))
    dcu_cost.add_arguments(sub.add_parser("dcu-cost", help="refresh, dual-cache decode and DCU forwards timed "
                                          "at one shape (does DCU pay on the engine?)"))
    args = ap.parse_args(argv)
    mains = {"quality": quality.main, "speed": speed.main, "report": report.main, "dcu-cost": dcu_cost.main}
    return mains[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
