#!/usr/bin/env bash
# Quality figures of BENCHMARKS.md: the reference engine (CUDA if present, else CPU; fp32) on the
# shipped checkpoints, suite seed 0.
#   PART=ladder bash scripts/quality_suite.sh [outdir]   # default outdir benchmarks/results/quality
# PART: foundation (vanilla / fast-dllm at gen 64), ladder (ODB ablation at gen 128) or all.
set -euo pipefail
out=${1:-benchmarks/results/quality}; mkdir -p "$out"
q() { python3 -m vllm_odb.bench quality --engine reference --seed 0 --json "$@" 2>/dev/null | tail -1; }
PART=${PART:-all}
for m in llada dream; do
  if [[ $PART != ladder ]]; then
  # Foundation: vanilla (1 token/step) and Fast-dLLM threshold 0.9, gen 64 >= 2x the longest answer.
  q --model checkpoints/tiny-$m --method vanilla   --limit 300 --gen-length 64 --block-length 32 --batch-size 100 > "$out/$m-vanilla-g64.json"
  q --model checkpoints/tiny-$m --method fast-dllm --limit 300 --gen-length 64 --block-length 32 --batch-size 100 > "$out/$m-fast-dllm-g64.json"
  fi
  [[ $PART == foundation ]] && continue
  # ODB ablation ladder, gen 128 >= 4x the longest answer, batch 1 (the draft budget is per forward).
  for t in 0.9 1.0; do
    for meth in fast-dllm odb-alp odb-jump odb; do
      q --model checkpoints/tiny-$m --method $meth --limit 200 --gen-length 128 --block-length 32 --threshold $t \
        --batch-size 1 > "$out/$m-$meth-g128-t$t.json"
    done
  done
done
echo done
