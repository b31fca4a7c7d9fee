#!/usr/bin/env bash
# Stage NVlabs/Fast-dLLM's LLaDA model code into .gpu/fastdllm/ for the baseline calibration
# (issue #8: `python -m vllm_odb.bench calibrate-fastdllm` times it beside the reference engine).
#
#   scripts/stage_fastdllm.sh <mirror-git-dir> [commit]
#
# <mirror-git-dir> is a git directory of github.com/NVlabs/Fast-dLLM (a bare mirror is fine);
# [commit] defaults to HEAD. The files are taken with `git show`, unmodified, into
# .gpu/fastdllm/ (gitignored: carried to the GPU machine at run time, never committed).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 <Fast-dLLM mirror git dir> [commit]" >&2
  exit 2
fi
GIT_DIR_SRC=$1
REV=${2:-HEAD}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.gpu/fastdllm"

g() { git --git-dir="$GIT_DIR_SRC" "$@"; }

COMMIT=$(g rev-parse --verify "$REV^{commit}")
FILES=(
  llada/model/__init__.py
  llada/model/configuration_llada.py
  llada/model/modeling_llada.py
  llada/generate.py
  LICENSE
)

# Refuse to write anywhere git would track (.gpu/ must be ignored).
if ! git -C "$ROOT" check-ignore -q "$DEST/x" 2>/dev/null; then
  echo "error: $DEST is not gitignored; refusing to stage third-party code there" >&2
  exit 1
fi

rm -rf "$DEST"
for f in "${FILES[@]}"; do
  if ! g cat-file -e "$COMMIT:$f" 2>/dev/null; then
    if [[ $f == LICENSE ]]; then continue; fi  # optional
    echo "error: $f not found at $COMMIT" >&2
    exit 1
  fi
  mkdir -p "$DEST/$(dirname "$f")"
  g show "$COMMIT:$f" > "$DEST/$f"
done

cat > "$DEST/SOURCE" <<EOF
repo: https://github.com/NVlabs/Fast-dLLM
commit: $COMMIT
files: ${FILES[*]}
note: NVlabs' code (Apache-2.0), unmodified; staged for timing only, never committed.
EOF

echo "staged Fast-dLLM @ ${COMMIT:0:12} into ${DEST#$ROOT/}/:"
for f in "${FILES[@]}"; do [[ -f $DEST/$f ]] && echo "  $f"; done
echo "NOTE: these files are NVlabs' Fast-dLLM code, not ours. They live only in the gitignored"
echo "      .gpu/fastdllm/ (carry it to the GPU run); never copy them into tracked files or commit them."
