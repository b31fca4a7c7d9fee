#!/usr/bin/env bash
# The one-step refactor's remaining GPU parity: six checks on one GPU in two waves of three (tiny
# models; each engine takes 28% of the GPU's memory). Six at once at 12% each failed to start:
# vLLM sizes its KV cache from the device's free memory, which the other engines' start-up
# allocations polluted ("Available KV cache memory: -14.74 GiB"). Every check exits non-zero on any
# mismatch. With VLLM_ODB_BENCH_KV_GIB set, each engine reserves that KV cache instead of profiling
# the free memory, and all six start at once.
#   OUT=out bash scripts/gpu_parity_all.sh        # $OUT/<name>.json and .log per check
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
run() {  # name, then the vllm-parity arguments
  local name=$1; shift
  timeout 420 python3 -m vllm_odb.bench vllm-parity --n 8 --block-length 16 --gpu-memory 0.28 "$@" \
    --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; echo "$name rc=$?" >> "$OUT/rc.txt"
}
jump=(--gen-length 128 --threshold 1.0 --method odb --select speculative --ridge-rows 64)
run dream-graphs-odb --model checkpoints/tiny-dream --mode graphs "${jump[@]}" &
run llada-eager-odb --model checkpoints/tiny-llada --mode eager "${jump[@]}" &
run llada-eager-apd --model checkpoints/tiny-llada --mode eager --gen-length 128 --method dynamic-apd &
[[ -n "${VLLM_ODB_BENCH_KV_GIB:-}" ]] || wait  # a fixed KV cache per engine (bench/serving.py): all six at once
run dream-eager-alp-alpha --model checkpoints/tiny-dream --mode eager --gen-length 128 --method odb-alp \
  --threshold-alpha 0.3 &
run dream-eager-suffix --model checkpoints/tiny-dream --mode eager --gen-length 128 --method fast-dllm \
  --suffix-window 16 --threshold-alpha 0.3 &
run llada-graphs-streaming --model checkpoints/tiny-llada --mode graphs --gen-length 128 --method odb-streaming \
  --suffix-window 16 --threshold 1.0 --ridge-rows 64 &
wait
sort "$OUT/rc.txt"
for f in "$OUT"/*.log; do echo "== $f"; tail -n 3 "$f"; done
! grep -qv "rc=0" "$OUT/rc.txt"
