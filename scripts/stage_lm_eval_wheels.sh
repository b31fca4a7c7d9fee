#!/usr/bin/env bash
# On this (CPU) machine: the wheels lm-eval needs on the GPU machine, which has no network and
# lacks them (its image has pandas, pyarrow, aiohttp, requests, sacrebleu, scikit-learn, ...).
# Writes .whl/ (ignored by git via .git/info/exclude); scripts/gpu_verify.sh PART=1/all installs
# them from there (carry ".whl"). The pure-Python ones published only as sources are built here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
for p in lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 multiprocess==0.70.19 pytablewriter==1.2.1 \
         DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 \
         typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4 more-itertools==11.2.1 tenacity==9.2.1 pytz==2026.6; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl "$p"
done
python3 -m pip wheel -q --no-deps rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1 -w .whl
ls .whl
