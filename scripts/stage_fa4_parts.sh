#!/usr/bin/env bash
# FlashAttention-4's CuTe-DSL kernels for the lent GPU, beside an already staged base set (.gpu/p*):
# vLLM 0.26 requires nvidia-cutlass-dsl[cu13] and quack-kernels, so a user's install has FA4, and
# vLLM upgrades FLASH_ATTN from FA3 to FA4 for a diffusion model on Hopper (our patch
# vllm_odb/patches/fa3_hopper.py keeps FA3 unless FA4 is asked for). ../shared/gpu/stage-vllm.sh --fa4
# restages everything (and empties .gpu/); this adds two parts, .gpu/f0 and .gpu/f1, instead.
# The FA4 wheels' own needs (cuda-bindings, nvdisasm, the DLPack extension) travel too and are
# installed on the device only where the image lacks them.
#   bash scripts/stage_fa4_parts.sh
# Device calls, between the base set's last copy and its install (same batch of calls):
#   carry [".gpu/f0"]  command: mkdir -p /root/stage/fa4 && cp .gpu/f0/* /root/stage/fa4/
#   carry [".gpu/f1"]  command: cp .gpu/f1/* /root/stage/fa4/
#   then, after the base install.sh:  bash /root/stage/fa4/install-fa4.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
cache="${GPU_WHEEL_CACHE:-$HOME/.cache/gpu-wheels}"
extra="$cache/fa4-needs"; mkdir -p "$extra"
plats=(); for n in 17 24 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
plats+=(--platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plats[@]}" -d "$1" "${@:2}" 2> >(grep -v 'is ignored' >&2); }
dl "$cache" -r ../shared/gpu/wheels-fa4.txt
dl "$extra" cuda-bindings nvidia-cuda-nvdisasm torch-c-dlpack-ext
tmp=$(mktemp -d)
mkdir "$tmp/w" "$tmp/w/needs"
grep -v '^#' ../shared/gpu/wheels-fa4.txt | while IFS='=' read -r name _ ver; do
  [[ -z $name ]] && continue
  f=$(ls "$cache" | grep -i "^$(echo "$name" | tr '-' '_')-${ver}-" | head -1)
  [[ -n $f ]] || { echo "missing wheel for $name==$ver" >&2; exit 1; }
  cp "$cache/$f" "$tmp/w/"
done
cp "$extra"/*.whl "$tmp/w/needs/"
tar -cf "$tmp/fa4.tar" -C "$tmp/w" .
sum=$(sha256sum "$tmp/fa4.tar" | cut -d' ' -f1)
rm -rf .gpu/f0 .gpu/f1 && mkdir -p .gpu/f0 .gpu/f1
split -b 55M -d -a 1 "$tmp/fa4.tar" "$tmp/fa4.tar."
mv "$tmp/fa4.tar.0" .gpu/f0/; mv "$tmp/fa4.tar.1" .gpu/f1/
[[ ! -e $tmp/fa4.tar.2 ]] || { echo "FA4 set is larger than two parts" >&2; exit 1; }
cat > .gpu/f0/install-fa4.sh <<INSTALL
#!/usr/bin/env bash
# Install FA4 (CuTe DSL) into /root/fa4-site after the base set (its needs only where the image lacks
# them), and put it on vllm-env.sh's path only if vLLM then reports FA4 supported: a broken FA4 set
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
check='from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported as s, fa_version_unsupported_reason as r; print("FA4 supported:", s(4), r(4) or ""); raise SystemExit(0 if s(4) else 1)'
if PYTHONPATH=\$PYTHONPATH:\$site timeout 120 python3 -c "\$check"; then
  echo 'export PYTHONPATH=\$PYTHONPATH:/root/fa4-site' >> /root/vllm-env.sh; echo "FA4 on the path"
else
  echo "FA4 left off the path"
fi
INSTALL
chmod +x .gpu/f0/install-fa4.sh
rm -rf "$tmp"
du -sh .gpu/f0 .gpu/f1
