#!/usr/bin/env bash
# The sampler's overlap (#21) and the canvas that follows the batch (#22) timed on a quiet GPU, after
# staging vLLM on the same warm machine. Everything lands in $OUT/overlap-<part>.tgz.
#   PART=profile OUT=$OUT bash scripts/gpu_overlap_speed.sh  # profile-decode-step, LLaDA-8B, batch 1: the plain
#       engine with overlap (the default) and without (VLLM_ODB_OVERLAP=0), then jump-share's step (~6 min)
#   PART=speed OUT=$OUT bash scripts/gpu_overlap_speed.sh    # bench speed on TRACES (default: the v6 traces, recorded
#       on the CPU in session 8 at ridge_rows 178; session 7 ran the v3 ones), LLaDA-8B, gen 1024:
#       METHODS (default fast-dllm,odb-alp,odb) at BATCHES (default 1,8,64), with VLLM_ODB_OVERLAP=${OVERLAP:-1};
#       ENGINE_ARGS (a JSON object) goes to the engines, e.g. '{"attention_backend": "FLASH_ATTN"}';
#       CODE=DIR runs DIR/vllm_odb (another revision) instead of this checkout's, for an A/B on one machine
#   PART=attn OUT=$OUT bash scripts/gpu_overlap_speed.sh     # the plain step's profile at gen 1024 on the default
#       backend (FA3 on Hopper), FA4 asked for, and Triton, refreshes included; then jump-share's step
#   PART=batch OUT=$OUT bash scripts/gpu_overlap_speed.sh    # the decode step at BATCH (default 8) requests, gen 1024,
#       on a plain engine and on a jump-share one (whose share of the draft budget is then below the window:
#       no drafts, so its step should cost the plain one's; session 10 measured odb 0.88x odb-alp at batch 8);
#       FA_SPLITS="4 8" adds the jump-share step with FA3's split count for graphs capped there
#   PART=refresh OUT=$OUT bash scripts/gpu_overlap_speed.sh  # the plain step's profile (its refresh steps too) with
#       the refresh forward's two routes, VLLM_ODB_REFRESH=dense and paged (engine/model_state.py)
#   PART=jump OUT=$OUT bash scripts/gpu_overlap_speed.sh     # jump-share's step profile with its attention outside
#       the CUDA graphs (VLLM_ODB_JUMP_GRAPHS=piecewise), FULL decode graphs per width (full) and FULL of any batch (full-any)
#   PART=alp OUT=$OUT bash scripts/gpu_overlap_speed.sh      # the plain step's profile replaying TRACES at gen 1024,
#       batch ${BATCH:-1}: fast-dllm, then odb-alp (its refresh steps: ALP's canvas predictions, the cut, the release);
#       METHODS="odb-alp odb" puts jump-share's engine beside it (session 14: its refresh steps ~12 ms slower)
#   PART=budget OUT=$OUT bash scripts/gpu_overlap_speed.sh   # odb at ridge_rows RIDGES (default 96 128 176 251), batches
#       BATCHES (default 1,2), same traces: the step's cost against its draft rows (a replay forces the traced commits,
#       so a budget below the traces' recording budget overstates its tokens per forward slightly)
#   PART=kernel OUT=$OUT bash scripts/gpu_overlap_speed.sh   # the draft-row kernel's tiles, warps and key splits
#       (scripts/gpu_draft_tiles.py, in CUDA graphs), then jump-share's step profile with the defaults
# TAG names a run's folder and tarball (overlap-$PART-$TAG), e.g. TAG=paged VLLM_ODB_REFRESH=paged PART=speed.
# On a machine of several GPUs, scripts/gpu_fanout.sh runs several parts at once, one a GPU.
set -uo pipefail
# Timed work needs a quiet GPU: a background training run (scripts/train_tiny.sh BACKGROUND=1, in
# $TRAIN_WORK) holds ~24 GB and the SMs. Wait up to TRAIN_WAIT seconds (default 0) for it to end,
# then refuse (session 11 lost its speed and profile calls to engines that could not start beside one).
TRAIN_WORK=${TRAIN_WORK:-/tmp/tiny-train}
for _ in $(seq 1 $(( ${TRAIN_WAIT:-0} / 5 ))); do [[ -d $TRAIN_WORK/code && ! -f $TRAIN_WORK/done ]] || break; sleep 5; done
if [[ -d $TRAIN_WORK/code && ! -f $TRAIN_WORK/done ]]; then
  echo "a training run is still going in $TRAIN_WORK (no $TRAIN_WORK/done): timed work needs a quiet GPU;" \
       "collect and stop it first (PHASE=collect STOP=1 bash scripts/train_tiny.sh) or give TRAIN_WAIT=seconds"
  exit 3
fi
source /root/vllm-env.sh
if [[ -z ${SKIP_INSTALL:-} ]]; then  # scripts/gpu_fanout.sh installs once for its parallel jobs
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
    || { echo "project install failed"; exit 1; }
fi
PART=${PART:?PART=profile, speed, budget, attn, batch, alp, refresh, jump or kernel}
OUT=${OUT:-/tmp/out}; P=$PART${TAG:+-$TAG}; R="$OUT/overlap-$P"; mkdir -p "$R"
# MODEL: the full-size config the speed parts replay at (llada-8b, or dream-7b with Dream's traces)
MODEL=${MODEL:-llada-8b}; case $MODEL in dream*) FMT=dream ;; *) FMT=llada ;; esac
DEFAULT_TRACES=benchmarks/results/dynamics/worked-v6-traces-$FMT.json
note() { echo "$1 rc=$2" | tee -a "$R/rc.txt"; }
prof() {  # name, timeout, VAR=value... --, profile-decode-step's arguments: $R/profile-<name>.{json,log}
  local name=$1 t=$2 envs=(); shift 2
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" timeout "$t" python3 -m vllm_odb.bench profile-decode-step --model llada-8b "$@" \
    --out "$R/profile-$name.json" > "$R/profile-$name.log" 2>&1
  note "profile-$name" $?
  grep steps_profiled "$R/profile-$name.log"
}
case $PART in
profile)
  for o in 1 0; do prof "overlap$o" 170 VLLM_ODB_OVERLAP=$o --; done
  [[ -n "${SKIP_JUMP:-}" ]] || prof jump 170 -- --speculative ;;
speed)
  # CODE=DIR: run another revision's package (DIR/vllm_odb, e.g. `git archive REV vllm_odb | tar -x -C DIR`)
  # on the same machine, for an A/B against this one; the traces stay this checkout's
  o=${OVERLAP:-1}; tr=$(realpath "${TRACES:-$DEFAULT_TRACES}"); R=$(realpath "$R")
  ( if [[ -n ${CODE:-} ]]; then cd "$CODE" || exit 1; export PYTHONPATH="$PWD:$PYTHONPATH"; fi
    python3 -c 'import vllm_odb; print("vllm_odb from", vllm_odb.__file__)' | tee "$R/code.txt"
    VLLM_ODB_OVERLAP=$o timeout ${SPEED_TIMEOUT:-520} python3 -m vllm_odb.bench speed --engine vllm --model "$MODEL" \
      --traces "$tr" --methods ${METHODS:-fast-dllm,odb-alp,odb} \
      --gen-lengths 1024 --batches ${BATCHES:-1,8,64} --requests 3 --row-seconds 20 --engine-args "${ENGINE_ARGS:-{\}}" \
      --out "$R/speed-overlap$o.json" > "$R/speed-overlap$o.log" 2>&1 )
  note "speed-overlap$o" $?
  tail -n 25 "$R/speed-overlap$o.log" ;;
budget)  # jump-share's step budget (ridge_rows: query rows a step, shared by the batch) at RIDGES, one engine
  # each, on the same traces: what the draft rows cost (session 14: ~18 us a draft row at batch 1 on the H100,
  # while the v8 checkpoints' tokens per forward level off past ~128 rows: BENCHMARKS "Session 14")
  tr=$(realpath "${TRACES:-$DEFAULT_TRACES}")
  for r in ${RIDGES:-96 128 176 251}; do
    # ~80 s an engine (start, capture, two rows): four fit one 600 s call; more RIDGES, split the call
    timeout ${SPEED_TIMEOUT:-130} python3 -m vllm_odb.bench speed --engine vllm --model "$MODEL" --traces "$tr" \
      --methods odb --gen-lengths 1024 --batches ${BATCHES:-1,2} --requests 3 --row-seconds 15 --ridge-rows "$r" \
      --out "$R/speed-ridge$r.json" > "$R/speed-ridge$r.log" 2>&1
    note "speed-ridge$r" $?
    grep -h '^{"method"' "$R/speed-ridge$r.log" | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line); print(r["batch"], r["tokens_per_s"], r.get("decode_step_ms_p50"), r.get("note", ""))'
  done ;;
attn)  # at gen 1024 (refreshes of ~1.5k tokens): ATTN_RUNS of name=engine-args, default the plugin's own
  # backend (FA3 on Hopper for bf16), FA4 asked for (staged with scripts/stage_fa4_parts.sh: its
  # start-up compiles CuTe-DSL kernels), Triton, and jump-share's step on the default; each bounded
  # by ATTN_TIMEOUT seconds (4 x 140 s fits a 600 s call; runs are split on spaces: no spaces in the JSON)
  runs=${ATTN_RUNS:-"fa3={} fa4={\"attention_config\":{\"flash_attn_version\":4}} triton={\"attention_backend\":\"TRITON_ATTN\"} jump-fa3=jump"}
  for r in $runs; do
    name=${r%%=*}; args=${r#*=}
    if [[ $args == jump ]]; then prof "$name" "${ATTN_TIMEOUT:-140}" -- --gen-length 1024 --speculative
    else prof "$name" "${ATTN_TIMEOUT:-140}" -- --gen-length 1024 --engine-args "$args"; fi
    grep -hoE "(FlashAttention [^\"]{0,60}|vllm-odb: (attention backend|FlashAttention)[^\"]{0,60})" \
      "$R/profile-$name.log" | sort -u | head -4
  done ;;
batch)
  b=${BATCH:-8}
  prof "plain-b$b" 200 -- --gen-length 1024 --batch "$b" --steps 40
  prof "jump-b$b" 200 -- --gen-length 1024 --batch "$b" --steps 40 --speculative
  # FA_SPLITS="4 8": the jump-share engine's FULL graphs run FA3 at vLLM's fixed split count for
  # graphs (flash_attn_max_num_splits_for_cuda_graph, 32); a suspect for its slower no-draft step
  for sp in ${FA_SPLITS:-}; do
    prof "jump-b$b-splits$sp" 200 -- --gen-length 1024 --batch "$b" --steps 40 --speculative \
      --engine-args "{\"attention_config\":{\"flash_attn_max_num_splits_for_cuda_graph\":$sp}}"
  done ;;
alp)
  b=${BATCH:-1}
  for m in ${METHODS:-fast-dllm odb-alp}; do  # odb: on a jump-share engine
    prof "$m-b$b" 200 -- --gen-length 1024 --batch "$b" --skip 10 --steps ${STEPS:-140} --method $m \
      --traces ${TRACES:-benchmarks/results/dynamics/worked-v6-traces-llada.json} $([[ $m == odb ]] && echo --speculative)
  done ;;
refresh)
  for r in dense paged; do prof "refresh-$r" 200 VLLM_ODB_REFRESH=$r -- --gen-length 1024 --steps 70; done ;;
jump)
  for g in piecewise full full-any; do prof "jump-$g" 250 VLLM_ODB_JUMP_GRAPHS=$g -- --speculative; done ;;
kernel)
  OUT="$R" timeout 240 python3 scripts/gpu_draft_tiles.py > "$R/draft-tiles.log" 2>&1
  note draft-tiles $?
  grep -v WARNING "$R/draft-tiles.log" | tail -n 12 | cut -c1-900
  prof jump 250 -- --speculative ;;
*) echo "PART=$PART: give profile, speed, budget, attn, batch, alp, refresh, jump or kernel"; exit 2 ;;
esac
sort "$R/rc.txt"
tar -czf "$OUT/overlap-$P.tgz" -C "$OUT" "overlap-$P" && rm -rf "$R"
