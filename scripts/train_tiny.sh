#!/usr/bin/env bash
# Train both tiny checkpoints on the lent GPU, then measure how they decode and record their traces.
#
#   PHASE=train OUT=out bash scripts/train_tiny.sh   # both formats at once; $OUT/tiny-{llada,dream}.tar
#   PHASE=eval  OUT=out bash scripts/train_tiny.sh   # bench dynamics + bench traces of $WORK's checkpoints;
#                                                    # $OUT/eval.tar (dynamics-*.json/.md, traces-*.json, logs)
#   PHASE=all   ...                                  # both (longer than one device call may run)
#   PHASE=gpus                                       # which GPUs each format would train on
# On a machine of several GPUs (nvidia-h100-x8: the session's device minutes count the same as for
# one) each format trains data parallel on its own half of them (torchrun; vllm_odb/tiny/parallel.py):
# four GPUs a format take four times the examples a step (--tokens-per-batch is per GPU).
# TRAIN_GPUS=1,2,3,4,5,6 picks them (GPU 0 left for timed work beside the training).
#   QUICK_EVAL=1 (with PHASE=train): after training, 20 prompts of fast-dllm per format (accuracy by
#                task, tokens per forward) in ~1 minute, so a training call reports how far it got;
#                leave room for it (MAXMIN=7.5 in a 10-minute call)
#
# Checkpoints are trained in $WORK (default /tmp/tiny-train), which the eval phase reads: on the
# device, make the two calls back to back so the machine stays warm (a first run's eval of 200 prompts
# per method and three trace lengths outran a call: hence LIMIT 100 and the bounded processes). INIT_DIR
# continues from earlier checkpoints ($INIT_DIR/tiny-FMT, --init). MAXMIN (default 6.8) fits each
# run's step count to that many minutes; the run records the steps it took (training_log.json), and
# `python -m vllm_odb.tiny.train --format F --out DIR --steps N` replays it.
#
# A run longer than one device call: BACKGROUND=1 starts this script detached (setsid: it outlives
# the call while the machine stays warm, i.e. while further calls follow within its idle limit)
# and returns at once; PHASE=collect later waits for it (at most WAIT seconds) and packs its tars
# into $OUT (STOP=1: a run still going is stopped after its partial checkpoints are packed, so that
# timed work can follow on a quiet GPU). Continue earlier checkpoints from carried tars with INIT_TARS=DIR (each tar holds
# tiny-FMT/, as PHASE=train packs them):
#   INIT_TARS=.gpu/ckpt-v3 BACKGROUND=1 PHASE=train QUICK_EVAL=1 MAXMIN=20 \
#     TRAIN_ARGS="--lr 5e-4 --task-weights chain=3,tally=2 --save-every 3" bash scripts/train_tiny.sh
#   ... other calls ...;  PHASE=collect WAIT=580 OUT=$OUT bash scripts/train_tiny.sh
# Checkpoints outlive the session only in git: `bash scripts/ckpt_history.sh save vN DIR` keeps the
# collected tars in history (out of the tree the device carries), `restore vN DIR` brings them back
# as INIT_TARS for the next continuation. The tree (~32 MiB) and both tars (~15 MiB each) leave no
# room in the 64 MiB a call carries, so they travel one per call, into a folder the machine keeps
# while warm (check both tars are there before training: a released machine loses the first):
#   bash scripts/ckpt_history.sh restore vN .gpu/init; mkdir -p .gpu/init-l .gpu/init-d
#   mv .gpu/init/tiny-llada.tar .gpu/init-l/; mv .gpu/init/tiny-dream.tar .gpu/init-d/
#   call (carry .gpu/init-l): mkdir -p /tmp/init-tars && cp .gpu/init-l/* /tmp/init-tars/
#   call (carry .gpu/init-d): cp .gpu/init-d/* /tmp/init-tars/ && ls /tmp/init-tars/tiny-{llada,dream}.tar \
#     && INIT_TARS=/tmp/init-tars BACKGROUND=1 PHASE=train ...
set -euo pipefail
OUT=${OUT:-out}; WORK=${WORK:-/tmp/tiny-train}; MAXMIN=${MAXMIN:-6.8}; PHASE=${PHASE:-all}
if [[ -n ${INIT_TARS:-} ]]; then  # final (tiny-FMT.tar) or partial (partial-tiny-FMT.tar) checkpoints
  INIT_DIR=${INIT_DIR:-/tmp/tiny-init}; mkdir -p "$INIT_DIR"; INIT_DIR=$(cd "$INIT_DIR" && pwd)
  for t in "$INIT_TARS"/*tiny-*.tar; do tar -xf "$t" -C "$INIT_DIR"; done  # a final tar sorts after its partial
  export INIT_DIR; INIT_TARS=
fi
if [[ ${BACKGROUND:-0} != 0 ]]; then  # a private copy of the code: later calls replace the working tree
  mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
  if [[ -d $WORK/code && ! -f $WORK/done ]]; then
    echo "a background run is still going in $WORK (no $WORK/done): collect it first, or use another WORK" >&2
    exit 2
  fi
  rm -rf "$WORK/code"; mkdir -p "$WORK/code"; cp -r vllm_odb scripts "$WORK/code/"
  cd "$WORK/code"
  rm -f "$WORK/done"
  BACKGROUND=0 INIT_TARS= WORK="$WORK" OUT="$WORK/out" setsid nohup bash -c 'bash scripts/train_tiny.sh; echo $? > "$0/done"' "$WORK" \
    > "$WORK/run.out" 2>&1 < /dev/null &
  echo $! > "$WORK/pid"  # setsid: the run's process group (PHASE=collect STOP=1 ends it)
  echo "started in the background; log $WORK/run.out; collect with PHASE=collect"
  exit 0
fi
if [[ $PHASE == collect ]]; then  # the finished run's tars, or (still running) its last --save-every checkpoints
  for _ in $(seq 1 $(( ${WAIT:-580} / 5 ))); do [[ -f $WORK/done ]] && break; sleep 5; done
  tail -n 30 "$WORK/run.out" || true
  mkdir -p "$OUT"
  if [[ -f $WORK/done ]]; then
    echo "background run ended, rc $(cat "$WORK/done")"; cp "$WORK"/out/*.tar "$OUT"/ 2>/dev/null || echo "no tars in $WORK/out"
  else
    echo "still running: packing its partial checkpoints"
    for d in "$WORK"/tiny-*/; do [[ -d $d ]] && tar -cf "$OUT/partial-$(basename "$d").tar" -C "$WORK" "$(basename "$d")"; done
    if [[ ${STOP:-0} != 0 && -f $WORK/pid ]]; then  # free the GPU for timed work that follows
      g=$(cat "$WORK/pid"); kill -- -"$g" 2>/dev/null || true; sleep 3
      kill -0 -- -"$g" 2>/dev/null && { kill -KILL -- -"$g" 2>/dev/null || true; sleep 2; }
      if kill -0 -- -"$g" 2>/dev/null; then echo "could not stop the run (process group $g)" >&2; exit 1; fi
      # torchrun starts its workers in sessions of their own, outside the group: end them by name
      pkill -KILL -f -- "vllm_odb.tiny.train .*--out $WORK/tiny-" 2>/dev/null || true; sleep 1
      if pgrep -f -- "vllm_odb.tiny.train .*--out $WORK/tiny-" > /dev/null; then
        echo "could not stop the run's training processes" >&2; exit 1
      fi
      echo stopped > "$WORK/done"; echo "stopped the run"
    fi
  fi
  exit 0
fi
# GPUs: on a machine of several, each format trains on its own half of them, data parallel over its
# share (torchrun, one process a GPU: vllm_odb/tiny/parallel.py); on one GPU both formats share it.
# TRAIN_GPUS=1,2,3,4 picks the GPUs (say, to keep GPU 0 for timed work meanwhile); 'none': the CPU.
if [[ -z ${TRAIN_GPUS:-} && -n ${CUDA_VISIBLE_DEVICES+x} ]]; then  # the GPUs the caller leaves visible
  TRAIN_GPUS=${CUDA_VISIBLE_DEVICES:-none}
elif [[ -z ${TRAIN_GPUS:-} ]]; then
  n=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  TRAIN_GPUS=$(seq -s, 0 $(( n - 1 )) 2>/dev/null); [[ $n -gt 0 ]] || TRAIN_GPUS=none
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
gpus_of() {  # the GPUs format number $1 (0 LLaDA, 1 Dream) trains on
  [[ $TRAIN_GPUS == none ]] && { echo none; return; }
  local all=(${TRAIN_GPUS//,/ }) half
  if [[ ${#all[@]} -lt 2 ]]; then echo "${all[0]}"; return; fi
  half=$(( ${#all[@]} / 2 ))
  local mine=("${all[@]:$(( $1 * half )):$half}")
  (IFS=,; echo "${mine[*]}")
}
train_one() {  # $1 format, $2 its GPUs: python3 alone on one GPU (or the CPU), torchrun on several
  local gpus=$2 launch=(python3)
  if [[ $gpus == *,* ]]; then
    launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$(tr , '\n' <<< "$gpus" | wc -l)")
  fi
  if [[ $gpus == none ]]; then export CUDA_VISIBLE_DEVICES=; else export CUDA_VISIBLE_DEVICES=$gpus; fi
  echo "$1: GPUs $gpus" >&2
  "${launch[@]}" -m vllm_odb.tiny.train --format "$1" --out "$WORK/tiny-$1" --steps 1000000 --max-minutes "$MAXMIN" \
    ${INIT_DIR:+--init "$INIT_DIR/tiny-$1"} ${TRAIN_ARGS:-}
}
if [[ $PHASE == gpus ]]; then  # the split, without training
  echo "llada: GPUs $(gpus_of 0)"; echo "dream: GPUs $(gpus_of 1)"; exit 0
fi
LIMIT=${LIMIT:-100}; JUMP_LIMIT=${JUMP_LIMIT:-48}; TRACE_GENS=${TRACE_GENS:-256,1024}; EVAL_TIMEOUT=${EVAL_TIMEOUT:-480}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu_at() {  # the eval phase's process $1 on GPU number $1 of TRAIN_GPUS (round robin)
  [[ $TRAIN_GPUS == none ]] && return
  local all=(${TRAIN_GPUS//,/ }); echo "${all[$(( $1 % ${#all[@]} ))]}"
}
if [[ $PHASE == train || $PHASE == all ]]; then
  echo "$TRAIN_GPUS" > "$WORK/gpus"  # scripts/gpu_fanout.sh keeps its timed parts off these
  i=0
  for fmt in llada dream; do
    ( train_one $fmt "$(gpus_of $i)" ) > "$WORK/train-$fmt.log" 2>&1 &
    i=$(( i + 1 ))
  done
  wait
  tail -n 4 "$WORK"/train-*.log
  if [[ ${QUICK_EVAL:-0} != 0 ]]; then  # a 20-prompt fast-dllm reading (accuracy by task), bounded
    i=0
    for fmt in llada dream; do  # on the format's first training GPU (not one kept for timed work)
      g=$(gpus_of $i); g=${g%%,*}; i=$(( i + 1 ))
      CUDA_VISIBLE_DEVICES=$([[ $g == none ]] || echo "$g") \
      timeout "${QUICK_EVAL_TIMEOUT:-75}" python3 -m vllm_odb.bench dynamics --model "$WORK/tiny-$fmt" \
        --methods fast-dllm --limit 20 --batch-size 20 --seed 0 --gen-length 512 \
        --out "$WORK/quick-eval-$fmt.json" > "$WORK/quick-eval-$fmt.md" 2> /dev/null &
    done
    wait || true
    cat "$WORK"/quick-eval-*.md
  fi
  for fmt in llada dream; do
    tar -cf "$OUT/tiny-$fmt.tar" -C "$WORK" "tiny-$fmt" "train-$fmt.log" $(cd "$WORK" && ls quick-eval-$fmt.* 2>/dev/null)
  done
fi
if [[ $PHASE == eval || $PHASE == all ]]; then
  # Four processes on the one GPU (the tiny models leave it mostly idle), each bounded so the results
  # are packed inside a device call's 10 minutes.
  # On several GPUs, each process takes its own.
  i=0
  for fmt in llada dream; do
    CUDA_VISIBLE_DEVICES=$(gpu_at $i) timeout "$EVAL_TIMEOUT" python3 -m vllm_odb.bench dynamics --model "$WORK/tiny-$fmt" \
      --limit "$LIMIT" --jump-limit "$JUMP_LIMIT" --seed 0 --gen-length 512 --out "$WORK/dynamics-$fmt.json" \
      > "$WORK/dynamics-$fmt.md" 2> "$WORK/dynamics-$fmt.log" &
    CUDA_VISIBLE_DEVICES=$(gpu_at $(( i + 1 ))) timeout "$EVAL_TIMEOUT" python3 -m vllm_odb.bench traces \
      --model "$WORK/tiny-$fmt" --gen-lengths "$TRACE_GENS" --out "$WORK/traces-$fmt.json" 2> "$WORK/traces-$fmt.log" &
    i=$(( i + 2 ))
  done
  wait || true
  cat "$WORK"/dynamics-*.md
  tail -n 2 "$WORK"/traces-*.log
  tar -cf "$OUT/eval.tar" -C "$WORK" $(cd "$WORK" && ls dynamics-* traces-* 2>/dev/null)
fi
