#!/usr/bin/env bash
# On the lent GPU, after staging vLLM (../shared/gpu/README.md): the ODB-on-vLLM checks.
#   PART=parity   bash scripts/gpu_odb_check.sh   # odb (ALP + early stop) parity, both tiny checkpoints
#   PART=loopback MODEL=tiny-llada bash scripts/gpu_odb_check.sh   # the OpenAI server loopback test
# Logs and JSON under $OUT.
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
case "${PART:-parity}" in
  parity)
    CHECKS="${CHECKS:-tiny-llada:eager tiny-dream:eager}" TAG="${TAG:--odb}" \
    PARITY_ARGS="${PARITY_ARGS:---method odb --select speculative --gen-length 128 --n 16 --ridge-rows 64 --threshold 1.0}" \
      bash scripts/gpu_vllm_check.sh ;;
  loopback)
    model="${MODEL:-tiny-llada}"
    SERVER_LOG="$OUT/server-$model.log" timeout 580 python3 -m vllm_odb.bench server-loopback \
      --model "checkpoints/$model" --clients "${CLIENTS:-64}" ${KV_BLOCKS:+--kv-blocks "$KV_BLOCKS"} --out "$OUT/loopback-$model.json" \
      > "$OUT/loopback-$model.log" 2>&1
    rc=$?
    grep -E '^\{"model"|MISMATCH|BAD-INPUT' "$OUT/loopback-$model.log" | head -20
    [[ $rc -ne 0 ]] && { echo "rc=$rc"; grep -vE "^(INFO|DEBUG)" "$OUT/loopback-$model.log" | tail -30;
                         grep -E "Error|Traceback" "$OUT/server-$model.log" | head -10; }
    exit $rc ;;
esac
