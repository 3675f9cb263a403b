#!/usr/bin/env bash
# Compiles every CUDA source in kernels/ for sm_90 on a machine without a GPU, so a kernel
# that does not compile never lands. Uses $NVCC, or nvcc on PATH, or installs NVIDIA's
# pinned compiler wheels from PyPI into $GENIUS_CUDA_TOOLKIT (default
# ~/.cache/genius-engine/cuda-toolkit). Headers (.cuh, .h) are compiled too, through a unit that
# includes them all. Output (cubins, and each unit's resource report in its .log) goes to
# target/kernels/.
set -euo pipefail
cd "$(dirname "$0")/.."

toolkit=${GENIUS_CUDA_TOOLKIT:-$HOME/.cache/genius-engine/cuda-toolkit}
nvcc=${NVCC:-}
if [[ -z $nvcc ]] && command -v nvcc >/dev/null; then nvcc=$(command -v nvcc); fi
if [[ -z $nvcc ]]; then
  nvcc=$toolkit/nvidia/cu13/bin/nvcc
  if [[ ! -x $nvcc ]]; then
    echo "compile-kernels: installing the CUDA 13.0 compiler from PyPI into $toolkit"
    python3 -m pip install --quiet --disable-pip-version-check --target "$toolkit" \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
  fi
  export PATH=$(dirname "$nvcc"):$PATH
fi
echo "compile-kernels: $("$nvcc" --version | tail -n 2 | head -n 1)"

out=target/kernels
mkdir -p "$out"
units=(kernels/*.cu)
headers=(kernels/*.cuh kernels/*.h)
check_unit=$out/all_headers.cu
: >"$check_unit"
for h in "${headers[@]}"; do
  [[ -e $h ]] && echo "#include \"$(basename "$h")\"" >>"$check_unit"
done
failed=0
compiled=0
for src in "$check_unit" "${units[@]}"; do
  [[ -e $src ]] || continue
  name=$(basename "$src" .cu)
  if "$nvcc" -arch=sm_90 -std=c++17 -I kernels -cubin -Xptxas -v -o "$out/$name.sm_90.cubin" "$src" \
    >"$out/$name.log" 2>&1; then
    compiled=$((compiled + 1))
  else
    failed=$((failed + 1))
    echo "compile-kernels: FAILED $src" >&2
    cat "$out/$name.log" >&2
  fi
done
echo "compile-kernels: $compiled unit(s) compiled for sm_90, $failed failed (${#headers[@]} header(s) checked)"
[[ $failed -eq 0 ]]
