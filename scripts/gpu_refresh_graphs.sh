#!/usr/bin/env bash
# Token parity of refreshes that replay PIECEWISE CUDA graphs (engine/model_state.py PagedRefresh):
# fp32 tiny checkpoints, CUDA graphs on, both formats, fast-dllm and odb-alp (ALP's cut canvases),
# alone and batched against the reference loop; an engine per lane at once, each with a fixed KV cache.
# METHODS (default fast-dllm odb-alp) may add odb: jump-share in fp32 runs PIECEWISE graphs (its FULL
# ones need the bf16 draft kernel), so its refreshes replay them too (ridge 64, the tiny vocabulary's
# bound: drafts alone, and in the batch once 3 or fewer requests are left).
#   OUT=out bash scripts/gpu_refresh_graphs.sh   # $OUT/refresh-graphs-<fmt>-<method>.{json,log}, rc.txt
#   METHODS="fast-dllm odb-alp odb" GPU_MEM=0.12 OUT=out bash scripts/gpu_refresh_graphs.sh   # six engines
#   METHODS="... odb-kernel": odb with the Triton draft kernel (VLLM_ODB_DRAFT_ATTENTION=triton), so an fp32
#   engine runs jump-share's bf16 graph mode: FULL decode graphs per step width, PIECEWISE refreshes
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
OUT=${OUT:-out}; mkdir -p "$OUT"; export VLLM_ODB_BENCH_KV_GIB=${VLLM_ODB_BENCH_KV_GIB:-2}
for fmt in llada dream; do
  for m in ${METHODS:-fast-dllm odb-alp}; do
    name=refresh-graphs-$fmt-$m; extra=(); env=()
    [[ $m == odb || $m == odb-kernel ]] && extra=(--select speculative --ridge-rows 64)
    # odb-kernel: odb with the Triton draft kernel in fp32, so the engine runs its bf16 graph mode
    # (FULL_AND_PIECEWISE: FULL decode graphs per step width, PIECEWISE refreshes)
    [[ $m == odb-kernel ]] && env=(VLLM_ODB_DRAFT_ATTENTION=triton)
    ( env "${env[@]}" timeout 300 python3 -m vllm_odb.bench vllm-parity --n 8 --block-length 16 --gen-length 128 --threshold 1.0 \
        --gpu-memory ${GPU_MEM:-0.2} --model checkpoints/tiny-$fmt --mode graphs --method ${m%-kernel} "${extra[@]}" --out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1; echo "$name rc=$?" >> "$OUT/rc.txt" ) &
  done
done
wait
sort "$OUT/rc.txt"
for f in "$OUT"/refresh-graphs-*.log; do echo "== $f"; tail -n 2 "$f"; done
# a lane passes only if its refreshes replayed graphs (the counter beside refresh_tokens)
for f in "$OUT"/refresh-graphs-*.json; do
  python3 -c 'import json, sys; g = json.load(open(sys.argv[1]))["summary"]["refresh_graph_tokens"]
print(sys.argv[1], "graphed refresh tokens", g["vllm"], "of", g["of"]); sys.exit(g["vllm"] == 0)' "$f" \
    || echo "$(basename "$f" .json) rc=no-graphed-refresh" >> "$OUT/rc.txt"
done
! grep -qv "rc=0" "$OUT/rc.txt"
