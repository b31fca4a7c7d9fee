#!/usr/bin/env bash
# Train both tiny checkpoints (on the lent GPU) and evaluate them with the quality command.
#   OUT=out bash scripts/train_tiny.sh   # $OUT/tiny-{llada,dream}.tar (checkpoints), $OUT/results.tar (logs, JSON)
# Checkpoints are trained in $WORK (default /tmp/tiny-train) and packed, since few files come back.
# Steps: STEPS (default 6000); MAXMIN caps each run's minutes (the run shrinks its step count to fit).
set -euo pipefail
OUT=${OUT:-out}; WORK=${WORK:-/tmp/tiny-train}; STEPS=${STEPS:-6000}; MAXMIN=${MAXMIN:-7}; LIMIT=${LIMIT:-300}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for fmt in llada dream; do
  python3 -m vllm_odb.tiny.train --format $fmt --out "$WORK/tiny-$fmt" --steps "$STEPS" --max-minutes "$MAXMIN" \
    ${TRAIN_ARGS:-} > "$WORK/train-$fmt.log" 2>&1 &
done
wait
for fmt in llada dream; do
  for method in vanilla fast-dllm; do
    python3 -m vllm_odb.bench quality --model "$WORK/tiny-$fmt" --method $method --limit "$LIMIT" --seed 0 \
      --gen-length 64 --block-length 32 --batch-size 250 --json 2>/dev/null | tail -1 > "$WORK/quality-$fmt-$method.json" || true
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['accuracy'], r['per_task'], r['nfe'])" "$WORK/quality-$fmt-$method.json" || true
  done
  # A canvas of one block, the shortest an ALP cut leaves.
  python3 -m vllm_odb.bench quality --model "$WORK/tiny-$fmt" --method fast-dllm --limit "$LIMIT" --seed 0 \
    --gen-length 32 --block-length 32 --threshold 1.0 --batch-size 250 --json 2>/dev/null | tail -1 > "$WORK/quality-$fmt-gen32.json" || true
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['accuracy'], r['per_task'], r['nfe'])" "$WORK/quality-$fmt-gen32.json" || true
done
tail -n 3 "$WORK"/train-*.log
for fmt in llada dream; do tar -cf "$OUT/tiny-$fmt.tar" -C "$WORK" "tiny-$fmt"; done
tar -cf "$OUT/results.tar" -C "$WORK" $(cd "$WORK" && ls *.log *.json)
