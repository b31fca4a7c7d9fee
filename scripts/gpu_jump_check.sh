#!/usr/bin/env bash
# Jump-share's draft rows on the GPU (issue #22), after staging vLLM on the same warm machine: the
# Triton kernel (engine/draft_attention.py, VLLM_ODB_DRAFT_ATTENTION=triton) against the SDPA
# route, then the engine's parity with it, then the jump-share step's profile and speed with each.
#   PART=1 OUT=$OUT bash scripts/gpu_jump_check.sh   # kernel test at full size; odb parity (both models,
#                                                    # eager and CUDA graphs) with the kernel; the step's
#                                                    # profile with each route (~7 min)
#   PART=kernel / PART=profile: the first part's two halves (the kernel test and parity share the GPU
#   with other work; the profile wants a quiet GPU). ROUTES (default "sdpa triton") picks the routes of
#   the profile and speed parts; METHODS (default odb) the speed part's methods.
#   PART=widths OUT=$OUT bash scripts/gpu_jump_check.sh  # odb parity at 4 requests with room for drafts (both
#                                                    # models, eager and graphs), then odb-alp and odb at batch
#                                                    # 1, 8 and 64 (METHODS, BATCHES) (~9 min)
#   PART=2 OUT=$OUT bash scripts/gpu_jump_check.sh   # speed rows of odb and odb-alp on the v3 traces,
#                                                    # LLaDA-8B, gen 1024, batch 1 and 64, each route (~8 min)
# Everything lands in $OUT/jump-<part>.tgz.
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
PART=${PART:?PART=1, kernel, profile or 2}
ROUTES=${ROUTES:-sdpa triton}
OUT=${OUT:-/tmp/out}; R="$OUT/jump-$PART"; mkdir -p "$R"
export VLLM_ODB_BENCH_KV_GIB=${VLLM_ODB_BENCH_KV_GIB:-2}
note() { echo "$1 rc=$2" | tee -a "$R/rc.txt"; }
case $PART in
1|kernel)
  timeout 240 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_engine_branches.py > "$R/kernel.log" 2>&1
  note kernel $?
  grep "draft rows of" "$R/kernel.log"
  jump=(--n 8 --block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --ridge-rows 64
        --gpu-memory 0.28)
  for m in "llada eager" "dream graphs" "llada graphs" "dream eager"; do
    set -- $m
    ( VLLM_ODB_DRAFT_ATTENTION=triton timeout 300 python3 -m vllm_odb.bench vllm-parity --model checkpoints/tiny-$1 \
        --mode $2 "${jump[@]}" --out "$R/parity-$1-$2-triton.json" > "$R/parity-$1-$2-triton.log" 2>&1
      note "parity-$1-$2-triton" $? ) &
    sleep 3
  done
  wait ;;&
1|profile)
  for route in $ROUTES; do
    VLLM_ODB_DRAFT_ATTENTION=$route timeout 200 python3 -m vllm_odb.bench profile-decode-step --model llada-8b \
      --speculative --out "$R/profile-jump-llada-8b-$route.json" > "$R/profile-$route.log" 2>&1
    note "profile-$route" $?
    grep steps_profiled "$R/profile-$route.log"
  done ;;
2)
  for route in $ROUTES; do
    VLLM_ODB_DRAFT_ATTENTION=$route timeout 260 python3 -m vllm_odb.bench speed --engine vllm --model llada-8b \
      --traces benchmarks/results/dynamics/worked-v3-traces-llada.json --methods ${METHODS:-odb} --gen-lengths 1024 \
      --batches 1,64 --requests 3 --row-seconds 30 --out "$R/speed-odb-$route.json" > "$R/speed-$route.log" 2>&1
    note "speed-$route" $?
  done ;;
widths)  # the canvas that follows the batch (knobs.step_width): odb parity where a batch narrows the
  # canvas but leaves drafts room (4 requests, ridge 128: 32 rows each), then the speed rows side by side
  wide=(--block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --ridge-rows 128
        --gpu-memory 0.28)
  for m in "llada graphs" "dream graphs" "llada eager" "dream eager"; do
    set -- $m
    ( timeout 300 python3 -m vllm_odb.bench vllm-parity --model checkpoints/tiny-$1 --mode $2 --n 4 "${wide[@]}" \
        --out "$R/parity-$1-$2-n4.json" > "$R/parity-$1-$2-n4.log" 2>&1
      note "parity-$1-$2-n4" $? ) &
    sleep 3
  done
  wait
  timeout 420 python3 -m vllm_odb.bench speed --engine vllm --model llada-8b \
    --traces benchmarks/results/dynamics/worked-v3-traces-llada.json --methods ${METHODS:-odb-alp,odb} \
    --gen-lengths 1024 --batches ${BATCHES:-1,8,64} --requests 3 --row-seconds 30 \
    --out "$R/speed-widths.json" > "$R/speed-widths.log" 2>&1
  note speed-widths $? ;;
kernel|profile) ;;
*) echo "PART=$PART: give 1, kernel, profile, 2 or widths"; exit 2 ;;
esac
sort "$R/rc.txt"
tar -czf "$OUT/jump-$PART.tgz" -C "$OUT" "jump-$PART" && rm -rf "$R"
