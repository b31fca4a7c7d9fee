#!/usr/bin/env bash
# The sampler's overlap (#21) and the canvas that follows the batch (#22) timed on a quiet GPU, after
# staging vLLM on the same warm machine. Everything lands in $OUT/overlap-<part>.tgz.
#   PART=profile OUT=$OUT bash scripts/gpu_overlap_speed.sh  # profile-decode-step, LLaDA-8B, batch 1: the plain
#       engine with overlap (the default) and without (VLLM_ODB_OVERLAP=0), then jump-share's step (~6 min)
#   PART=speed OUT=$OUT bash scripts/gpu_overlap_speed.sh    # bench speed on the v3 traces, LLaDA-8B, gen 1024:
#       METHODS (default fast-dllm,odb-alp,odb) at BATCHES (default 1,8,64), with VLLM_ODB_OVERLAP=${OVERLAP:-1};
#       ENGINE_ARGS (a JSON object) goes to the engines, e.g. '{"attention_backend": "FLASH_ATTN"}'
#   PART=attn OUT=$OUT bash scripts/gpu_overlap_speed.sh     # the plain step's profile with vLLM's FlashAttention
#       backend (bf16) against the Triton one it replaces (the 1.3 ms of attention a batch-1 step spends)
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
PART=${PART:?PART=profile, speed or attn}
OUT=${OUT:-/tmp/out}; R="$OUT/overlap-$PART"; mkdir -p "$R"
note() { echo "$1 rc=$2" | tee -a "$R/rc.txt"; }
case $PART in
profile)
  for o in 1 0; do
    VLLM_ODB_OVERLAP=$o timeout 170 python3 -m vllm_odb.bench profile-decode-step --model llada-8b \
      --out "$R/profile-llada-8b-overlap$o.json" > "$R/profile-overlap$o.log" 2>&1
    note "profile-overlap$o" $?
    grep steps_profiled "$R/profile-overlap$o.log"
  done
  [[ -n "${SKIP_JUMP:-}" ]] || { timeout 170 python3 -m vllm_odb.bench profile-decode-step --model llada-8b --speculative \
      --out "$R/profile-jump-llada-8b.json" > "$R/profile-jump.log" 2>&1
    note profile-jump $?
    grep steps_profiled "$R/profile-jump.log"; } ;;
speed)
  o=${OVERLAP:-1}
  VLLM_ODB_OVERLAP=$o timeout ${SPEED_TIMEOUT:-520} python3 -m vllm_odb.bench speed --engine vllm --model llada-8b \
    --traces benchmarks/results/dynamics/worked-v3-traces-llada.json --methods ${METHODS:-fast-dllm,odb-alp,odb} \
    --gen-lengths 1024 --batches ${BATCHES:-1,8,64} --requests 3 --row-seconds 20 --engine-args "${ENGINE_ARGS:-{\}}" \
    --out "$R/speed-overlap$o.json" > "$R/speed-overlap$o.log" 2>&1
  note "speed-overlap$o" $?
  tail -n 25 "$R/speed-overlap$o.log" ;;
attn)
  for b in TRITON_ATTN FLASH_ATTN; do
    timeout 200 python3 -m vllm_odb.bench profile-decode-step --model llada-8b --engine-args "{\"attention_backend\": \"$b\"}" \
      --out "$R/profile-llada-8b-$b.json" > "$R/profile-$b.log" 2>&1
    note "profile-$b" $?
    grep steps_profiled "$R/profile-$b.log"
  done ;;
*) echo "PART=$PART: give profile, speed or attn"; exit 2 ;;
esac
sort "$R/rc.txt"
tar -czf "$OUT/overlap-$PART.tgz" -C "$OUT" "overlap-$PART" && rm -rf "$R"
