#!/usr/bin/env bash
# The GPU runs that verify the one-step refactor (#20), the ecosystem work (#23) and serving under
# load and faults (#24), in two parts of under ten minutes each, after staging vLLM (same warm
# machine). Many tiny engines run at once on one GPU: VLLM_ODB_BENCH_KV_GIB gives each harness
# engine a fixed KV cache, so none sizes its cache from memory the others are still allocating
# (bench/serving.memory_kwargs). Everything lands in $OUT/verify-<part>.tgz (logs, JSON reports).
#   PART=1 OUT=$OUT bash scripts/gpu_verify.sh   # the refactor's six parity checks (SKIP_SIX=1 skips them),
#       the GPU tests: tests/test_gpu{,_vllm,_lm_eval,_examples}.py, test_gpu_reliability.py -k "not soak"
#   PART=2 OUT=$OUT bash scripts/gpu_verify.sh   # reliability: fuzz x2, soak x4, faults x2 (full size), and
#       test_gpu_reliability.py -k soak
#   PART=parity ...                              # the six parity checks and the engine's GPU tests (no lm-eval)
#   PART=overlap ...                             # parity, GPU tests, jump-share at 4 requests, a soak, faults
#       (SKIP_SIX=1 and SKIP_SOAK=1 leave out the parity checks and the soak and faults)
#   PART=next ...                                # session 8's unrun changes: paged refresh, FULL-graph jump steps
#   PART=plans ...                               # session 9: jump-share's device-side plans (+ FULL graphs, paged refresh)
#   PART=fa ...                                  # FlashAttention as the default: bf16 agreement, FA vs Triton
#   PART=eco ...                                 # lm-eval, examples, reliability but soaks (carry .whl)
#   PART=all ...                                 # one call: soak x2 (llada default, dream odb), faults, fuzz,
#       and the GPU tests but test_gpu_reliability.py (carry .whl)
# lm-eval and its pure-Python needs travel as wheels in .whl (scripts/stage_lm_eval_wheels.sh; carry .whl).
set -uo pipefail
source /root/vllm-env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
PART=${PART:?PART=1, 2, all, parity, overlap, next, plans, fa, eco or fixes}
OUT=${OUT:-/tmp/out}; R="$OUT/verify-$PART"; mkdir -p "$R"
export VLLM_ODB_BENCH_KV_GIB=${VLLM_ODB_BENCH_KV_GIB:-2}
LIMIT=${LIMIT:-540}   # seconds every lane must end within (the call's limit is 600)
START=$(date +%s)
left() { local t=$((LIMIT - ($(date +%s) - START))); echo $((t > 1 ? t : 1)); }  # timeout 0 = no limit
lane() {  # name, command...: runs in the background, bounded by the time left, rc recorded
  local name=$1; shift
  # SIGINT first: the harness's `with Server(...)` then stops its server (a new session, which
  # timeout's own signal would miss), so no server outlives its lane.
  ( SERVER_LOG="$R/$name.server.log" timeout -s INT -k 30 "$(left)" "$@" > "$R/$name.log" 2>&1
    echo "$name rc=$? t=$(( $(date +%s) - START ))s" >> "$R/rc.txt" ) &
  sleep "${STAGGER:-3}"
}
bench=(python3 -m vllm_odb.bench)                       # arrays, not functions: timeout runs commands
pt=(python3 -m pytest -m gpu -q -p no:cacheprovider)
M=checkpoints

case $PART in
1)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/lm-site .whl/*.whl \
    && export PYTHONPATH=${PYTHONPATH:-}:/root/lm-site || echo "lm-eval wheels did not install" | tee "$R/wheels.log"
  LIMIT=$((LIMIT - 100))  # keep 100 s for the defaults server below
  [[ -n "${SKIP_SIX:-}" ]] || lane parity-six env OUT="$R/parity-six" bash scripts/gpu_parity_all.sh
  lane pytest-vllm "${pt[@]}" -n ${XDIST:-5} tests/test_gpu_vllm.py -k "not defaults"
  lane pytest-ref "${pt[@]}" tests/test_gpu.py
  lane pytest-lm-eval "${pt[@]}" tests/test_gpu_lm_eval.py
  lane pytest-reliability-other "${pt[@]}" tests/test_gpu_reliability.py -k "not soak"
  lane pytest-examples "${pt[@]}" tests/test_gpu_examples.py
  wait
  # vLLM's defaults (90% of the GPU): alone, after the others
  LIMIT=$((LIMIT + 100))
  lane pytest-defaults "${pt[@]}" tests/test_gpu_vllm.py -k defaults
  wait ;;
2)
  S=(--requests 1000 --clients 200 --max-seconds $((LIMIT - 40)))
  [[ -n "${SKIP_SOAK:-}" ]] || lane soak-llada "${bench[@]}" server-soak --model $M/tiny-llada "${S[@]}" --port 8801 --out "$R/soak-llada.json"
  lane soak-llada-odb "${bench[@]}" server-soak --model $M/tiny-llada --speculative "${S[@]}" --port 8802 --out "$R/soak-llada-odb.json"
  lane soak-dream "${bench[@]}" server-soak --model $M/tiny-dream "${S[@]}" --port 8803 --out "$R/soak-dream.json"
  lane soak-dream-odb "${bench[@]}" server-soak --model $M/tiny-dream --speculative "${S[@]}" --port 8804 --out "$R/soak-dream-odb.json"
  lane fuzz-llada "${bench[@]}" server-fuzz --model $M/tiny-llada --n 200 --eager --port 8805 --out "$R/fuzz-llada.json"
  lane fuzz-dream-odb "${bench[@]}" server-fuzz --model $M/tiny-dream --speculative --n 200 --eager --port 8806 --out "$R/fuzz-dream-odb.json"
  lane faults-llada-odb "${bench[@]}" server-faults --model $M/tiny-llada --speculative --port 8807 --out "$R/faults-llada-odb.json"
  lane faults-dream "${bench[@]}" server-faults --model $M/tiny-dream --eager --port 8808 --out "$R/faults-dream.json"
  lane pytest-reliability-soak "${pt[@]}" tests/test_gpu_reliability.py -k soak   # its two soaks share a port
  wait ;;
all)  # one call when device time is short: a run of each kind, both checkpoints and both engines covered
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/lm-site .whl/*.whl \
    && export PYTHONPATH=${PYTHONPATH:-}:/root/lm-site || echo "lm-eval wheels did not install" | tee "$R/wheels.log"
  LIMIT=$((LIMIT - 90))
  S=(--requests 1000 --clients 200 --max-seconds $((LIMIT - 30)))
  [[ -n "${SKIP_SOAK:-}" ]] || lane soak-llada "${bench[@]}" server-soak --model $M/tiny-llada "${S[@]}" --port 8801 --out "$R/soak-llada.json"
  lane soak-dream-odb "${bench[@]}" server-soak --model $M/tiny-dream --speculative "${S[@]}" --port 8804 --out "$R/soak-dream-odb.json"
  lane faults-llada-odb "${bench[@]}" server-faults --model $M/tiny-llada --speculative --port 8807 --out "$R/faults-llada-odb.json"
  lane fuzz-llada "${bench[@]}" server-fuzz --model $M/tiny-llada --n 200 --eager --port 8805 --out "$R/fuzz-llada.json"
  lane pytest-vllm "${pt[@]}" -n ${XDIST:-4} tests/test_gpu_vllm.py -k "not defaults"
  lane pytest-ref "${pt[@]}" tests/test_gpu.py
  lane pytest-lm-eval "${pt[@]}" tests/test_gpu_lm_eval.py
  lane pytest-examples "${pt[@]}" tests/test_gpu_examples.py
  wait
  LIMIT=$((LIMIT + 90))
  lane pytest-defaults "${pt[@]}" tests/test_gpu_vllm.py -k defaults
  wait ;;
parity)  # token parity and the engine's GPU tests alone, after a sampler change (no lm-eval wheels needed)
  LIMIT=$((LIMIT - 100))
  [[ -n "${SKIP_SIX:-}" ]] || lane parity-six env OUT="$R/parity-six" bash scripts/gpu_parity_all.sh
  lane pytest-vllm "${pt[@]}" -n ${XDIST:-4} tests/test_gpu_vllm.py -k "not defaults"
  lane pytest-ref "${pt[@]}" tests/test_gpu.py tests/test_policies.py
  wait
  LIMIT=$((LIMIT + 100))
  lane pytest-defaults "${pt[@]}" tests/test_gpu_vllm.py -k defaults
  wait ;;
overlap)  # the sampler's overlap (#21: a step's outcome read at the next step), beside other GPU work:
  # the six parity checks, the engine's GPU tests, jump-share parity where a batch narrows the canvas
  # (#22), and a soak and the fault injection on the plain engine, which now overlaps (no defaults
  # server: it takes 90% of the GPU)
  [[ -n "${SKIP_SIX:-}" ]] || lane parity-six env OUT="$R/parity-six" bash scripts/gpu_parity_all.sh
  lane pytest-vllm "${pt[@]}" -n ${XDIST:-4} tests/test_gpu_vllm.py -k "not defaults"
  lane pytest-ref "${pt[@]}" tests/test_gpu.py tests/test_policies.py
  wide=(--block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --ridge-rows 128
        --gpu-memory 0.28)
  for m in "llada graphs" "dream eager"; do
    set -- $m
    lane parity-$1-$2-n4 "${bench[@]}" vllm-parity --model $M/tiny-$1 --mode $2 --n 4 "${wide[@]}" \
      --out "$R/parity-$1-$2-n4.json"
  done
  lane pytest-branches "${pt[@]}" tests/test_engine_branches.py   # the draft-row kernel: values, compiles once
  lane parity-dream-eager-n4-check env VLLM_ODB_CHECK=1 "${bench[@]}" vllm-parity --model $M/tiny-dream --mode eager \
    --n 4 "${wide[@]}" --out "$R/parity-dream-eager-n4-check.json"   # session 7: NFE 19 vs 18 here; the history says why
  [[ -n "${SKIP_SOAK:-}" ]] || lane soak-llada "${bench[@]}" server-soak --model $M/tiny-llada --requests 600 --clients 100 \
    --max-seconds $((LIMIT - 60)) --port 8801 --out "$R/soak-llada.json"
  [[ -n "${SKIP_SOAK:-}" ]] || lane faults-dream "${bench[@]}" server-faults --model $M/tiny-dream --eager --port 8808 \
    --out "$R/faults-dream.json"
  wait ;;
next)  # session 8's changes, not yet run on a GPU: the refresh on vLLM's forward (VLLM_ODB_REFRESH=paged),
  # jump-share steps in FULL CUDA graphs (VLLM_ODB_JUMP_GRAPHS=full; fp32 parity needs the kernel route,
  # VLLM_ODB_DRAFT_ATTENTION=triton), and session 7's tests that never ran
  lane pytest-new "${pt[@]}" -n ${XDIST:-4} tests/test_gpu_vllm.py -k "paged_refresh or overlap"
  lane pytest-branches "${pt[@]}" tests/test_engine_branches.py
  full=(env VLLM_ODB_JUMP_GRAPHS=full VLLM_ODB_DRAFT_ATTENTION=triton)
  odb=(--block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --gpu-memory 0.2)
  for f in llada dream; do
    lane jump-full-$f "${full[@]}" "${bench[@]}" vllm-parity --model $M/tiny-$f --mode graphs --n 8 "${odb[@]}" \
      --ridge-rows 64 --out "$R/jump-full-$f.json"
    lane jump-full-$f-n4 "${full[@]}" "${bench[@]}" vllm-parity --model $M/tiny-$f --mode graphs --n 4 "${odb[@]}" \
      --ridge-rows 128 --out "$R/jump-full-$f-n4.json"
    lane jump-full-paged-$f "${full[@]}" VLLM_ODB_REFRESH=paged "${bench[@]}" vllm-parity --model $M/tiny-$f \
      --mode graphs --n 8 "${odb[@]}" --ridge-rows 64 --out "$R/jump-full-paged-$f.json"
  done
  lane parity-dream-eager-n4-check env VLLM_ODB_CHECK=1 "${bench[@]}" vllm-parity --model $M/tiny-dream --mode eager \
    --n 4 --block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --ridge-rows 128 \
    --gpu-memory 0.2 --out "$R/parity-dream-eager-n4-check.json"
  wait ;;
plans)  # session 9: jump-share plans laid out on the device at the step width (the default route now),
  # then with session 8's FULL graphs and paged refresh on top; the GPU kernel tests of the new layout
  lane pytest-branches "${pt[@]}" tests/test_engine_branches.py
  lane pytest-odb "${pt[@]}" tests/test_gpu_vllm.py -k "odb_matches or paged_refresh or serve_speculative"
  odb=(--block-length 16 --gen-length 128 --threshold 1.0 --method odb --select speculative --gpu-memory 0.12)
  full=(env VLLM_ODB_JUMP_GRAPHS=full VLLM_ODB_DRAFT_ATTENTION=triton)
  for f in llada dream; do
    lane jump-$f "${bench[@]}" vllm-parity --model $M/tiny-$f --mode graphs --n 8 "${odb[@]}" --ridge-rows 64 \
      --out "$R/jump-$f.json"
    lane jump-$f-n4 "${bench[@]}" vllm-parity --model $M/tiny-$f --mode graphs --n 4 "${odb[@]}" --ridge-rows 128 \
      --out "$R/jump-$f-n4.json"
    lane jump-full-paged-$f "${full[@]}" VLLM_ODB_REFRESH=paged "${bench[@]}" vllm-parity --model $M/tiny-$f \
      --mode graphs --n 8 "${odb[@]}" --ridge-rows 64 --out "$R/jump-full-paged-$f.json"
  done
  wait ;;
fa)  # FlashAttention as the default (bf16/fp16 on Hopper, FA3 pinned: models/hook.py, patches/fa3_hopper.py).
  # The tiny checkpoints in bf16 on the default backend and on Triton, fast-dllm (eager) and odb (CUDA
  # graphs, FULL on the draft kernel), each against the reference loop in bf16: agreement, not parity
  # (bf16 rounds differently in every kernel; the fp32 parity lanes run Triton as before). Then FA4
  # asked for (the pin must let it through), and the defaults server (bf16 checkpoint: FA3 now).
  LIMIT=$((LIMIT - 130))  # keep 130 s for the defaults server below, alone (it takes 90% of the GPU)
  bf=(--dtype bfloat16 --gen-length 128 --block-length 16)
  odb=(--threshold 1.0 --method odb --select speculative --ridge-rows 64)
  for f in llada dream; do
    for b in default TRITON_ATTN; do
      ab=(); [[ $b == default ]] || ab=(--attention-backend $b)
      lane agree-$f-fast-$b "${bench[@]}" vllm-parity --model $M/tiny-$f --mode eager --n 16 "${bf[@]}" "${ab[@]}" \
        --out "$R/agree-$f-fast-$b.json"
      lane agree-$f-odb-$b "${bench[@]}" vllm-parity --model $M/tiny-$f --mode graphs --n 8 "${bf[@]}" "${odb[@]}" \
        "${ab[@]}" --out "$R/agree-$f-odb-$b.json"
    done
  done
  lane agree-llada-fast-fa4 "${bench[@]}" vllm-parity --model $M/tiny-llada --mode eager --n 16 "${bf[@]}" \
    --flash-attn-version 4 --out "$R/agree-llada-fast-fa4.json"
  wait
  LIMIT=$((LIMIT + 130))
  lane pytest-defaults "${pt[@]}" tests/test_gpu_vllm.py -k defaults
  wait
  for f in "$R"/agree-*.json; do python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; \
print(sys.argv[1].split('/')[-1], 'alone', s['alone_match'], 'batched', s['batched_match'], 'of', s['n'], \
'prefix', s['alone_prefix_share'], s['batched_prefix_share'], 'nfe', s['nfe'])" "$f"; done
  grep -hoE "(FlashAttention [^\"]{0,80}|Using [A-Z_]+ (attention )?backend[^\"]{0,40}|vllm-odb: (attention backend|FlashAttention)[^\"]{0,60})" \
    "$R"/*.log | sort | uniq -c | head -20 ;;
eco)  # the ecosystem checks alone (#23): lm-eval against the server and in-process, the examples, and
  # the reliability tests but the soaks (the fuzz's good request); light enough to share the GPU
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/lm-site .whl/*.whl \
    && export PYTHONPATH=${PYTHONPATH:-}:/root/lm-site || echo "lm-eval wheels did not install" | tee "$R/wheels.log"
  lane pytest-lm-eval "${pt[@]}" tests/test_gpu_lm_eval.py
  lane pytest-examples "${pt[@]}" tests/test_gpu_examples.py
  lane pytest-reliability-other "${pt[@]}" tests/test_gpu_reliability.py -k "not soak"
  wait ;;
fixes)  # the two runs that found bugs, after their fixes (eager: they start faster)
  lane fuzz-llada "${bench[@]}" server-fuzz --model $M/tiny-llada --n 200 --eager --port 8805 --out "$R/fuzz-llada.json"
  lane faults-llada-odb "${bench[@]}" server-faults --model $M/tiny-llada --speculative --eager --phases requests \
    --port 8807 --out "$R/faults-llada-odb.json"
  wait ;;
*) echo "PART=$PART: give 1, 2, all, parity, overlap, next, plans, fa, eco or fixes"; exit 2 ;;
esac
sort "$R/rc.txt"
for f in "$R"/*.log; do case $f in *.server.log) continue ;; esac; echo "== $f"; grep -vE "^(INFO|DEBUG|\(EngineCore)" "$f" | tail -n 6; done
tar -czf "$OUT/verify-$PART.tgz" -C "$OUT" "verify-$PART" && rm -rf "$R"
