#!/usr/bin/env bash
# Several timed parts of scripts/gpu_overlap_speed.sh at once on a machine of several GPUs
# (nvidia-h100-x2/x4/x8): one part a GPU, each in its own process tree with its own compile caches.
# A session's device minutes count the same for one GPU or eight, so eight parts that each take a
# call on one GPU take one call here. After staging vLLM (../shared/gpu/README.md):
#
#   JOBS='0:PART=speed METHODS=fast-dllm,odb-alp,odb BATCHES=1,8;1:PART=speed BATCHES=32,64;
#         2:PART=speed MODEL=dream-7b;3:PART=kernel' OUT=$OUT bash scripts/gpu_fanout.sh
#
# JOBS: ';'-separated "GPU:VAR=value VAR=value ..." (no spaces inside a value), each the settings
# of one gpu_overlap_speed.sh run on GPU number GPU. A job's TAG defaults to gpuN, so each lands
# in its own $OUT/overlap-PART-TAG.tgz (at most 8 jobs: a call brings back 8 files). Timings of
# different GPUs are not divided by each other: every comparison that a ratio needs runs inside one
# job (one GPU), as the part's METHODS do. The project is installed once, before the jobs.
# Beside a background training run (scripts/train_tiny.sh BACKGROUND=1 TRAIN_GPUS=..., in $TRAIN_WORK,
# default /tmp/tiny-train), the GPUs it trains on are read from its $TRAIN_WORK/gpus (or given as
# TRAIN_GPUS): a job on one of them is refused, and the jobs skip the quiet-GPU wait that guards
# the GPU a training run holds. The call's exit status is 1 if any job's was not 0.
# DRY=1 prints each job's command line and runs nothing.
set -uo pipefail
set -f  # a value such as X=* stays as written
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
JOBS=${JOBS:?JOBS='GPU:VAR=value ...;GPU:...' (see the header)}
IFS=";" read -ra jobs <<< "$(tr "\n" " " <<< "$JOBS")"  # newlines in JOBS: spaces
TRAIN_WORK=${TRAIN_WORK:-/tmp/tiny-train}
if [[ -z ${TRAIN_GPUS:-} && -d $TRAIN_WORK/code && ! -f $TRAIN_WORK/done ]]; then  # a background run is going
  TRAIN_GPUS=$(cat "$TRAIN_WORK/gpus" 2>/dev/null) \
    || { echo "gpu_fanout: a training run is going in $TRAIN_WORK and names no GPUs: give TRAIN_GPUS" >&2; exit 2; }
fi
[[ ${TRAIN_GPUS:-} == none ]] && TRAIN_GPUS=
declare -A seen=() tags=()
busy=","
for g in $(tr , " " <<< "${TRAIN_GPUS:-}"); do [[ $g =~ ^[0-9]+$ ]] && busy+="$((10#$g)),"; done
n=0; specs=()
for j in "${jobs[@]}"; do
  j=${j#"${j%%[![:space:]]*}"}; j=${j%"${j##*[![:space:]]}"}  # trim spaces and newlines around a job
  [[ -z $j ]] && continue
  if [[ ! $j =~ ^[0-9]+: ]]; then echo "gpu_fanout: job '$j' does not start with a GPU number and ':'" >&2; exit 2; fi
  gpu=$((10#${j%%:*})); vars=${j#*:}
  if [[ -n ${seen[$gpu]:-} ]]; then echo "gpu_fanout: two jobs on GPU $gpu would time each other" >&2; exit 2; fi
  if [[ $busy == *",$gpu,"* ]]; then echo "gpu_fanout: GPU $gpu is training (TRAIN_GPUS=$TRAIN_GPUS)" >&2; exit 2; fi
  [[ " $vars" == *" PART="* ]] || { echo "gpu_fanout: job on GPU $gpu names no PART" >&2; exit 2; }
  [[ " $vars" == *" TAG="* ]] || vars="$vars TAG=gpu$gpu"
  part=$(tr ' ' '\n' <<< " $vars" | sed -n 's/^PART=//p' | tail -n 1)
  tag=$(tr ' ' '\n' <<< " $vars" | sed -n 's/^TAG=//p' | tail -n 1)
  if [[ -n ${tags[$part-$tag]:-} ]]; then
    echo "gpu_fanout: two jobs write overlap-$part-$tag (GPUs ${tags[$part-$tag]} and $gpu): give each its own TAG" >&2
    exit 2
  fi
  tags[$part-$tag]=$gpu; seen[$gpu]=1; specs+=("$gpu|$vars"); n=$(( n + 1 ))
done
(( n > 0 )) || { echo "gpu_fanout: JOBS holds no job" >&2; exit 2; }
(( n <= 8 )) || { echo "gpu_fanout: $n jobs: a call brings back 8 files, one a job" >&2; exit 2; }
if [[ -z ${DRY:-} ]]; then
  have=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  for s in "${specs[@]}"; do
    (( ${s%%|*} < have )) || { echo "gpu_fanout: GPU ${s%%|*}, but this machine has $have" >&2; exit 2; }
  done
  source /root/vllm-env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/vllm-site . >/dev/null 2>&1 \
    || { echo "project install failed"; exit 1; }
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
quiet=${TRAIN_GPUS:+/nonexistent-training-dir}  # the training runs on other GPUs
pids=()
for s in "${specs[@]}"; do
  gpu=${s%%|*}; vars=${s#*|}; c=/tmp/fanout-gpu$gpu
  cmd=(env CUDA_VISIBLE_DEVICES="$gpu" VLLM_CACHE_ROOT="$c/vllm" TRITON_CACHE_DIR="$c/triton"
       TORCHINDUCTOR_CACHE_DIR="$c/inductor" SKIP_INSTALL=1 OUT="$OUT" ${quiet:+TRAIN_WORK=$quiet} $vars
       bash scripts/gpu_overlap_speed.sh)
  if [[ -n ${DRY:-} ]]; then echo "${cmd[*]}"; continue; fi
  mkdir -p "$c"; "${cmd[@]}" > "$c.log" 2>&1 &
  pids+=($!)
done
[[ -n ${DRY:-} ]] && exit 0
rc=0; k=0
for s in "${specs[@]}"; do
  wait "${pids[$k]}"; r=$?; k=$(( k + 1 )); (( r == 0 )) || rc=1
  gpu=${s%%|*}; echo "== GPU $gpu (rc $r): ${s#*|}"; tail -n "${TAIL:-20}" "/tmp/fanout-gpu$gpu.log" | cut -c1-400
done
ls "$OUT"
exit $rc
