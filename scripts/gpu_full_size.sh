#!/usr/bin/env bash
# On the lent GPU, after staging vLLM: full-size random-init per-step cost, one model per call.
#   MODEL=llada-8b bash scripts/gpu_full_size.sh
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
timeout 560 python3 -m vllm_odb.bench vllm-full-size --model "$MODEL" --out "$OUT/full-$MODEL.json" ${FULL_ARGS:-} \
  > "$OUT/full-$MODEL.log" 2>&1
rc=$?
grep -E '^\{"model"' "$OUT/full-$MODEL.log" || { echo "rc=$rc"; grep -vE "^(INFO|DEBUG)|INFO " "$OUT/full-$MODEL.log" | tail -40; }
gzip -f "$OUT/full-$MODEL.log"
exit $rc
