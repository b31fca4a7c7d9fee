#!/usr/bin/env bash
# On the lent GPU, after staging vLLM (../shared/gpu/README.md): the speed benchmarks (issue #8).
# One part per call (each under the 10-minute limit); results accumulate in $RESULTS (kept on the
# machine between calls while it stays warm) and a copy goes to $OUT.
#   PART=calib       bash scripts/gpu_speed.sh   # Fast-dLLM vs reference per-forward, gen 256 and 1024 (carry .gpu/fastdllm)
#   PART=reference   bash scripts/gpu_speed.sh   # reference engine: tiny rows, then 8B replay rows
#   PART=vllm-plain  bash scripts/gpu_speed.sh   # vLLM fast-dllm / odb-alp, 8B replay, batch 1..64
#   PART=vllm-jump   bash scripts/gpu_speed.sh   # vLLM odb (jump-share engine), 8B replay
#   PART=repro       bash scripts/gpu_speed.sh   # METHOD gen 1024 x 64 with VLLM_ODB_CHECK=1 (+ENGINE_ARGS)
# Knobs: MODEL (llada-8b), SPEED_FILE (speed-$MODEL.json; a new name starts a new file), GENS, BATCHES,
# REQUESTS, ROW_SECONDS, METHODS, REFERENCE_IMPL (research | plain), STEP_TIMEOUT.
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
RESULTS="${RESULTS:-/root/speed}"; mkdir -p "$RESULTS"
MODEL="${MODEL:-llada-8b}"
SPEED_FILE="${SPEED_FILE:-speed-$MODEL.json}"  # rows accumulate here (a new name starts a new file)
# Committed traces (and rows) seed a fresh machine: the replay is of the same recorded dynamics.
for f in benchmarks/results/speed/traces-$MODEL.json benchmarks/results/speed/$SPEED_FILE; do
  [[ -f "$f" && ! -f "$RESULTS/$(basename "$f")" ]] && cp "$f" "$RESULTS/"
done
GENS="${GENS:-256,512,1024}"
run() { echo "+ python -m vllm_odb.bench speed $*"; timeout "${STEP_TIMEOUT:-560}" python3 -m vllm_odb.bench speed "$@" \
          --traces "$RESULTS/traces-$MODEL.json" --out "$RESULTS/$SPEED_FILE" 2>>"$OUT/log-$PART.txt";
        rc=$?; grep -vE "it/s\]|s/it\]|^\s*$" "$OUT/log-$PART.txt" | grep -E '^\{|error|Error|Traceback' | tail -40
        echo "rc=$rc"; }
case "${PART:-reference}" in
  calib)
    for g in 256 1024; do
      timeout 270 python3 -m vllm_odb.bench calibrate-fastdllm --fastdllm-dir .gpu/fastdllm --config 8b --device cuda \
        --dtype bfloat16 --iters 20 --prompt-len 512 --gen-length $g --block-length 32 --variants --profile \
        --out "$OUT/calib-fastdllm-8b-g$g.json" > "$OUT/calib-g$g.log" 2>&1; echo "calib gen $g rc=$?"
      grep -E "^\[calibrate\]" "$OUT/calib-g$g.log" | tail -1
    done ;;
  reference)
    run --engine reference --model "$MODEL" --methods "${METHODS:-vanilla,fast-dllm-prefix,fast-dllm,odb-alp,odb}" \
      --gen-lengths "$GENS" --batches 1 --requests "${REQUESTS:-3}" --row-seconds "${ROW_SECONDS:-45}" \
      --reference-impl "${REFERENCE_IMPL:-research}" ;;
  vllm-plain)
    run --engine vllm --model "$MODEL" --methods fast-dllm,odb-alp --gen-lengths "$GENS" \
      --batches "${BATCHES:-1,8,32}" --requests "${REQUESTS:-3}" ;;
  repro)  # a large case with the engine's checks on (VLLM_ODB_CHECK=1: syncs, so its timings are not
          # kept; the row goes to a scratch file). METHOD (odb-alp), REPRO_GENS (1024), BATCHES, ENGINE_ARGS (JSON).
    args=(--engine vllm --model "$MODEL" --methods "${METHOD:-odb-alp}" --gen-lengths "${REPRO_GENS:-1024}"
          --batches "${BATCHES:-64}" --requests 1 --engine-args "${ENGINE_ARGS:-{\}}")
    echo "+ VLLM_ODB_CHECK=1 python -m vllm_odb.bench speed ${args[*]}"
    VLLM_ODB_CHECK=1 timeout "${STEP_TIMEOUT:-400}" python3 -m vllm_odb.bench speed "${args[@]}" \
      --traces "$RESULTS/traces-$MODEL.json" --out /tmp/repro.json 2>"$OUT/log-$PART.txt"; echo "rc=$?"
    grep -E 'vllm-odb check' -A70 "$OUT/log-$PART.txt" | grep -vE "it/s\]|s/it\]" | head -90
    grep -E '^\{|Error' "$OUT/log-$PART.txt" | grep -v "it/s\]" | tail -4 ;;
  vllm-jump)
    run --engine vllm --model "$MODEL" --methods odb --gen-lengths "$GENS" --batches "${BATCHES:-1,8,64}" \
      --requests "${REQUESTS:-3}" ;;
esac
cp "$RESULTS"/*.json "$OUT/" 2>/dev/null
exit 0
