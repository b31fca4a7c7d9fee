"""``python -m vllm_odb.bench <command> ...``: the benchmarks and the GPU checks, one subcommand each
(``--help`` lists them)."""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_odb.errors import ODBError, cli_error

# command -> (module in vllm_odb.bench, help). Modules are imported when their command runs, so a
# command's heavy imports (vLLM, the GPU) are paid only by it.
COMMANDS = {
    "quality": ("quality", "accuracy on the synthetic suite (the verifier of the checkpoint's suite)"),
    "dynamics": ("dynamics", "how a checkpoint decodes: tokens per forward, answer lengths, first forwards, EOS fill, "
                             "ALP cuts, accepted drafts"),
    "traces": ("traces", "record a checkpoint's decoding traces for the speed benchmarks (every method, both engines)"),
    "speed": ("speed", "tokens/s, latency, NFE and step cost per method and engine (full-size configs by trace replay)"),
    "report": ("report", "speed results JSON -> markdown summary and PNG plots"),
    "dcu-cost": ("dcu_cost", "refresh, dual-cache decode and DCU forwards timed at one shape (does DCU pay on the engine?)"),
    "vllm-parity": ("parity", "vLLM engine vs the reference loop on a tiny checkpoint: tokens, NFE, canvas, drafts (GPU)"),
    "server-loopback": ("loopback", "the OpenAI server end to end: streams, stop strings, bad input, metrics (GPU)"),
    "server-fuzz": ("fuzz", "malformed requests against the OpenAI server: 4xx only, never a 5xx or a hang (GPU)"),
    "server-soak": ("soak", "200 streaming clients, 1,000 requests with aborts: answers equal offline, KV returned, "
                            "latency (GPU)"),
    "server-faults": ("fault_check", "injected failures: a faulted request ends with an error, the others and the server "
                                     "go on; an engine crash fails /health (GPU)"),
    "vllm-full-size": ("vllm_full_size", "full-size random-weight per-step cost on the vLLM engine (GPU)"),
    "profile-decode-step": ("profile_decode", "where a batch-1 decode step of the engine spends its time (GPU)"),
    "calibrate-fastdllm": ("calibrate", "reference engine vs Fast-dLLM's model code, per forward (GPU; staged code)"),
    "measure-ridge": ("ceilings", "the GPU's matmul and copy ceilings and the ridge point (GPU)"),
    "quality-tables": ("quality_tables", "BENCHMARKS.md's quality tables from scripts/quality_suite.sh's JSON"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_odb.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_) in COMMANDS.items():
        parser = sub.add_parser(name, help=help_, description=help_)
        if argv[:1] == [name]:  # only the chosen command's module is imported
            importlib.import_module(f"vllm_odb.bench.{module}").add_arguments(parser)
    args = ap.parse_args(argv)
    try:
        return importlib.import_module(f"vllm_odb.bench.{COMMANDS[args.command][0]}").main(args)
    except ODBError as e:  # input every command refuses alike (a bad checkpoint directory): one line, exit 2
        return cli_error(e)


if __name__ == "__main__":
    sys.exit(main())
