#!/usr/bin/env bash
# Keep in-training checkpoints in git history, out of the working tree.
#
# Each session's checkout is new: nothing outside git survives it (`.gpu/` is ignored), so the
# worked suite's checkpoints were lost twice and training restarted from scratch. Shipping them in
# the tree is no way out either: the device carries the tree and its staged parts in 64 MiB a call,
# and two in-training checkpoints (~15 MB each in bf16) would leave no room for the parts. So a
# checkpoint that training will continue is committed once and removed in the next commit: its
# blobs stay in history (a clone fetches them), the tree stays as small as before, and
# benchmarks/results/dynamics/checkpoint-history.txt records where each version lives.
#
#   bash scripts/ckpt_history.sh save VERSION DIR   # DIR holds tiny-llada/ and/or tiny-dream/ (or their
#                                                   # tars from train_tiny.sh): two commits on this branch
#   bash scripts/ckpt_history.sh restore VERSION OUT   # OUT/tiny-FMT.tar for each format kept, the
#                                                   # layout train_tiny.sh's INIT_TARS reads
#   bash scripts/ckpt_history.sh list
# Continue a restored version on the device (carry OUT, one format per call if both pass 64 MiB):
#   INIT_TARS=OUT BACKGROUND=1 PHASE=train ... bash scripts/train_tiny.sh
set -euo pipefail
abs() { [[ $1 = /* ]] && echo "$1" || echo "$PWD/$1"; }  # DIR and OUT as given, before the cd
[[ $# -ge 3 ]] && set -- "$1" "$2" "$(abs "$3")"
cd "$(git rev-parse --show-toplevel)"
RECORD=benchmarks/results/dynamics/checkpoint-history.txt
GIT=(git -c user.name="$(git config user.name || echo vllm-odb)" -c user.email="$(git config user.email || echo dev@vllm-odb.invalid)")
die() { echo "ckpt_history: $*" >&2; exit 2; }
valid_version() { [[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "VERSION '$1': letters, digits, '.', '_' and '-' only"; }
recorded() { [[ -f $RECORD ]] && awk -v v="$1" '$1 == v' "$RECORD" | tail -n 1; }  # the version's line, exactly

case ${1:-} in
save)
  [[ $# -eq 3 ]] || die "usage: save VERSION DIR"
  version=$2; src=$3; valid_version "$version"
  [[ -d $src ]] || die "DIR '$src' is not a folder"
  [[ -z $(recorded "$version") ]] || die "version $version is already in $RECORD"
  [[ -z $(git status --porcelain) ]] || die "the working tree has changes: commit or stash them first"
  dest=checkpoints/in-training/$version
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  for t in "$src"/*tiny-*.tar; do [[ -e $t ]] && tar -xf "$t" -C "$tmp"; done  # a final tar sorts after its partial
  for d in "$src"/tiny-*/; do [[ -d $d ]] && cp -r "$d" "$tmp/"; done
  found=()
  for fmt in llada dream; do
    d=$tmp/tiny-$fmt
    [[ -d $d ]] || continue
    [[ -f $d/config.json && -f $d/model.safetensors ]] || die "$d lacks config.json or model.safetensors"
    mkdir -p "$dest"; cp -r "$d" "$dest/"; found+=("$fmt")
  done
  ((${#found[@]})) || die "DIR '$src' holds no tiny-llada or tiny-dream checkpoint (folders or tars)"
  "${GIT[@]}" add -f "$dest"
  "${GIT[@]}" commit -q -m "Checkpoints $version (${found[*]}) kept in history; the next commit takes them out of the tree"
  sha=$(git rev-parse HEAD)
  "${GIT[@]}" rm -r -q "$dest"
  rmdir checkpoints/in-training 2>/dev/null || true
  echo "$version $sha $dest ${found[*]}" >> "$RECORD"
  "${GIT[@]}" add "$RECORD"
  "${GIT[@]}" commit -q -m "Checkpoints $version out of the tree (kept in $sha: scripts/ckpt_history.sh restore $version DIR)"
  echo "saved $version (${found[*]}) in $sha" ;;
restore)
  [[ $# -eq 3 ]] || die "usage: restore VERSION OUT"
  version=$2; out=$3; valid_version "$version"
  line=$(recorded "$version") || true
  [[ -n $line ]] || die "version $version is not in $RECORD (bash scripts/ckpt_history.sh list)"
  read -r _ sha path _ <<< "$line"
  git cat-file -e "$sha^{commit}" 2>/dev/null || die "commit $sha of $version is not in this clone (a shallow clone? git fetch --unshallow)"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  git archive "$sha" "$path" | tar -x -C "$tmp"
  mkdir -p "$out"
  compgen -G "$out/*tiny-*.tar" > /dev/null && die "OUT '$out' already holds checkpoint tars: give an empty folder"
  for d in "$tmp/$path"/tiny-*/; do
    tar -cf "$out/$(basename "$d").tar" -C "$tmp/$path" "$(basename "$d")"
    echo "restored $out/$(basename "$d").tar"
  done
  [[ -e $out/tiny-llada.tar && -e $out/tiny-dream.tar ]] || \
    echo "ckpt_history: $version holds one format only; train_tiny.sh trains both (train the other from scratch)" >&2 ;;
list)
  [[ -f $RECORD ]] && cat "$RECORD" || echo "no checkpoints kept yet ($RECORD)" ;;
*) die "give save VERSION DIR, restore VERSION OUT or list" ;;
esac
