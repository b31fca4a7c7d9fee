"""``python -m vllm_odb.bench {quality,speed,report} ...``"""

from __future__ import annotations

import argparse
import sys

from vllm_odb.bench import dcu_cost, dynamics, quality, report, speed, traces


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_odb.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    quality.add_arguments(sub.add_parser("quality", help="accuracy on the synthetic suite (its verifier)"))
    dynamics.add_arguments(sub.add_parser("dynamics", help="how a checkpoint decodes: tokens per forward, answer "
                                          "lengths, first forwards, EOS fill, ALP cuts, accepted drafts"))
    traces.add_arguments(sub.add_parser("traces", help="record a checkpoint's decoding traces for the speed "
                                        "benchmarks (every method, both engines)"))
    speed.add_arguments(sub.add_parser("speed", help="tokens/s, latency, NFE and step cost per method and engine "
                                       "(full-size configs by trace replay)"))
    report.add_arguments(sub.add_parser("report", help="speed results JSON -> markdown summary and PNG plots"))
    dcu_cost.add_arguments(sub.add_parser("dcu-cost", help="refresh, dual-cache decode and DCU forwards timed "
                                          "at one shape (does DCU pay on the engine?)"))
    args = ap.parse_args(argv)
    mains = {"quality": quality.main, "dynamics": dynamics.main, "traces": traces.main, "speed": speed.main, "report": report.main, "dcu-cost": dcu_cost.main}
    return mains[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
