"""``python -m vllm_odb.bench quality-tables [DIR]``: BENCHMARKS.md's quality tables from the JSON
files ``scripts/quality_suite.sh`` writes (default DIR benchmarks/results/quality), as markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("root", nargs="?", default="benchmarks/results/quality", help="the quality JSON directory")


def main(args: argparse.Namespace) -> int:
    root = Path(args.root)

    def load(name):
        p = root / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None

    _foundation(load)
    print()
    _ladder(load)
    return 0


def _foundation(load) -> None:
    print("| model | decoder | exact match | add | sort | reverse | count | word | NFE / request | tokens / forward |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in ("llada", "dream"):
        for meth in ("vanilla", "fast-dllm"):
            r = load(f"{m}-{meth}-g64")
            if r:
                t = r["per_task"]
                print(f"| tiny-{m} | {meth} | {r['accuracy']:.3f} | {t['add']:.2f} | {t['sort']:.2f} | "
                      f"{t['reverse']:.2f} | {t['count']:.2f} | {t['word']:.2f} | {r['nfe']:.2f} | "
                      f"{r['tokens_per_forward']:.2f} |")


def _ladder(load) -> None:
    print("| model | threshold | method | exact match | NFE / request | vs fast-dllm | refresh tokens | vs fast-dllm | "
          "predicted length | actual length | drafted tokens / forward | query rows / forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in ("llada", "dream"):
        for t in ("0.9", "1.0"):
            base = load(f"{m}-fast-dllm-g128-t{t}")
            for meth in ("fast-dllm", "odb-alp", "odb-jump", "odb"):
                r = load(f"{m}-{meth}-g128-t{t}")
                if not r:
                    continue
                rn = r["nfe"] / base["nfe"] if base else float("nan")
                rr = r["refresh_tokens"] / base["refresh_tokens"] if base else float("nan")
                print(f"| tiny-{m} | {t} | {meth} | {r['accuracy']:.3f} | {r['nfe']:.2f} | {rn:.2f}x | "
                      f"{r['refresh_tokens']:.0f} | {rr:.2f}x | {r['predicted_length']:.1f} | "
                      f"{r['actual_length']:.1f} | {r['drafted_per_forward']:.2f} | {r['query_rows_per_forward']:.1f} |")
