#!/usr/bin/env bash
# FlashAttention-4's CuTe-DSL kernels for the lent GPU, beside an already staged base set (.gpu/p*):
# vLLM 0.26 requires nvidia-cutlass-dsl[cu13] and quack-kernels, so a user's install has FA4, and
# vLLM upgrades FLASH_ATTN from FA3 to FA4 for a diffusion model on Hopper (our patch
# vllm_odb/patches/fa3_hopper.py keeps FA3 unless FA4 is asked for). ../shared/gpu/stage-vllm.sh --fa4
# restages everything (and empties .gpu/, checkpoints kept there included); this adds parts .gpu/f0, f1, ... instead.
# The FA4 wheels' own needs (cuda-bindings, nvdisasm, the DLPack extension) travel too and are
# installed on the device only where the image lacks them.
#   bash scripts/stage_fa4_parts.sh
# It prints the device calls: between the base set's last copy and its install (same batch of calls),
# one copy per part, then bash /root/stage/fa4/install-fa4.sh after the base install.sh.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
cache="${GPU_WHEEL_CACHE:-$HOME/.cache/gpu-wheels}"
extra="$cache/fa4-needs"; mkdir -p "$extra"
plats=(); for n in 17 24 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
plats+=(--platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plats[@]}" -d "$1" "${@:2}" 2> >(grep -v 'is ignored' >&2); }
dl "$cache" -r ../shared/gpu/wheels-fa4.txt
NEEDS=(cuda-bindings==13.5.0 nvidia-cuda-nvdisasm==13.5.37 torch-c-dlpack-ext==0.1.5)  # pinned: one wheel each
dl "$extra" "${NEEDS[@]}"
tmp=$(mktemp -d)
mkdir "$tmp/w" "$tmp/w/needs"
grep -v '^#' ../shared/gpu/wheels-fa4.txt | while IFS='=' read -r name _ ver; do
  [[ -z $name ]] && continue
  f=$(ls "$cache" | grep -i "^$(echo "$name" | tr '-' '_')-${ver}-" | head -1 || true)
  [[ -n $f ]] || { echo "missing wheel for $name==$ver" >&2; exit 1; }
  cp "$cache/$f" "$tmp/w/"
done
for need in "${NEEDS[@]}"; do
  name=${need%%==*}; ver=${need#*==}
  f=$(ls "$extra" | grep -i "^$(echo "$name" | tr '-' '_')-${ver}-" | head -1 || true)
  [[ -n $f ]] || { echo "missing wheel for $need" >&2; exit 1; }
  cp "$extra/$f" "$tmp/w/needs/"
done
tar -cf "$tmp/fa4.tar" -C "$tmp/w" .
sum=$(sha256sum "$tmp/fa4.tar" | cut -d' ' -f1)
# A call carries the tracked tree (~33 MiB) plus its carry within 64 MiB: parts of 26 MiB, as the
# base set's (a 55 MiB part was refused: "the working tree is larger than 64 MiB").
rm -rf .gpu/f[0-9]*
split -b 26M -d -a 1 "$tmp/fa4.tar" "$tmp/fa4.tar."
n=0
for part in "$tmp"/fa4.tar.*; do mkdir -p ".gpu/f$n"; mv "$part" ".gpu/f$n/"; n=$((n + 1)); done
cat > .gpu/f0/install-fa4.sh <<INSTALL
#!/usr/bin/env bash
# Install FA4 (CuTe DSL) into /root/fa4-site after the base set (its needs only where the image lacks
# them), and put it on vllm-env.sh's path only if FA4's interface then imports: a broken FA4 set
# must not take the base set down with it.
set -euo pipefail
cd /root/stage/fa4
cat fa4.tar.* > fa4.tar
echo "$sum  fa4.tar" | sha256sum -c --quiet || { echo "FA4 parts incomplete or stale: send them again" >&2; exit 1; }
rm -rf w && mkdir w && tar -xf fa4.tar -C w && rm -f fa4.tar fa4.tar.*
source /root/vllm-env.sh
site=/root/fa4-site; rm -rf \$site
pip_in() { python3 -m pip install -q --no-index --no-deps --no-compile --target \$site "\$@"; }
pip_in w/*.whl
python3 -c "import cuda.bindings" 2>/dev/null || pip_in w/needs/cuda_bindings-*.whl
python3 -c "import nvidia.cuda_nvdisasm" 2>/dev/null || pip_in w/needs/nvidia_cuda_nvdisasm-*.whl
python3 -c "import torch_c_dlpack_ext" 2>/dev/null || pip_in w/needs/torch_c_dlpack_ext-*.whl
# vLLM's is_fa_version_supported(4) only looks for cute/interface.py: import FA4's interface itself
# (cutlass, its DSL and quack with it)
check='import vllm.vllm_flash_attn.cute.interface; from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported as s; print("FA4 imports; supported:", s(4)); raise SystemExit(0 if s(4) else 1)'
if PYTHONPATH=\$PYTHONPATH:\$site timeout 120 python3 -c "\$check"; then
  echo 'export PYTHONPATH=\$PYTHONPATH:/root/fa4-site' >> /root/vllm-env.sh; echo "FA4 on the path"
else
  echo "FA4 left off the path"
fi
INSTALL
chmod +x .gpu/f0/install-fa4.sh
rm -rf "$tmp"
du -sh .gpu/f[0-9]*
echo "calls (after the base set's last copy, before its install):"
echo "  carry [\".gpu/f0\"]  command: mkdir -p /root/stage/fa4 && cp .gpu/f0/* /root/stage/fa4/"
for ((i = 1; i < n; i++)); do echo "  carry [\".gpu/f$i\"]  command: cp .gpu/f$i/* /root/stage/fa4/"; done
echo "  then, after the base install.sh:  bash /root/stage/fa4/install-fa4.sh"
