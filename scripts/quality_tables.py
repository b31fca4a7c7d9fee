"""Render benchmarks/results/quality/*.json (from scripts/cpu_quality.sh) as markdown tables."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality")


def load(name):
    p = root / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None


print("| model | decoder | exact match | add | sort | reverse | count | word | NFE / request | tokens / forward |")
print("|---|---|---|---|---|---|---|---|---|---|")
for m in ("llada", "dream"):
    for meth in ("vanilla", "fast-dllm"):
        r = load(f"{m}-{meth}-g64")
        if r:
            t = r["per_task"]
            print(f"| tiny-{m} | {meth} | {r['accuracy']:.3f} | {t['add']:.2f} | {t['sort']:.2f} | {t['reverse']:.2f} | "
                  f"{t['count']:.2f} | {t['word']:.2f} | {r['nfe']:.2f} | {r['tokens_per_forward']:.2f} |")
print()
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
            print(f"| tiny-{m} | {t} | {meth} | {r['accuracy']:.3f} | {r['nfe']:.2f} | {rn:.2f}x | {r['refresh_tokens']:.0f} | "
                  f"{rr:.2f}x | {r['predicted_length']:.1f} | {r['actual_length']:.1f} | {r['drafted_per_forward']:.2f} | "
                  f"{r['query_rows_per_forward']:.1f} |")
