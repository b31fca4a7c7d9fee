#!/usr/bin/env bash
# On the lent GPU, after staging vLLM (../shared/gpu/README.md): install the project, then run the
# vLLM-vs-reference parity checks named in $CHECKS (model:mode pairs), logs and JSON under $OUT.
#   CHECKS="tiny-llada:eager tiny-dream:eager" bash scripts/gpu_vllm_check.sh
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT/parity"
CHECKS="${CHECKS:-tiny-llada:eager tiny-dream:eager}"
status=0
for c in $CHECKS; do
  model="${c%%:*}"; mode="${c##*:}"
  tag="$model-$mode${TAG:-}"; log="$OUT/parity/$tag.log"
  echo "== $model $mode ${PARITY_ARGS:-}" | tee -a "$OUT/parity/summary.txt"
  timeout "${CHECK_TIMEOUT:-300}" python3 -m vllm_odb.bench vllm-parity --model "checkpoints/$model" --mode "$mode" \
    --out "$OUT/parity/$tag.json" ${PARITY_ARGS:-} > "$log" 2>&1
  rc=$?; [[ $rc -ne 0 ]] && status=$rc
  grep -E '^\{"model"|MISMATCH' "$log" | head -5 | tee -a "$OUT/parity/summary.txt"
  [[ $rc -ne 0 ]] && { echo "rc=$rc"; grep -vE "^(INFO|DEBUG)" "$log" | tail -40; }
done
[[ -n "${PYTEST_GPU:-}" ]] && { timeout 900 python3 -m pytest -m gpu -q tests/test_gpu.py tests/test_gpu_vllm.py \
  > "$OUT/parity/pytest-gpu.log" 2>&1; echo "pytest -m gpu rc=$?"; tail -3 "$OUT/parity/pytest-gpu.log"; }
tar -czf "$OUT/parity.tgz" -C "$OUT" parity && rm -rf "$OUT/parity"
exit $status
