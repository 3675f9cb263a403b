#!/usr/bin/env bash
# Builds the test executables that tools/gpu-check.sh runs on a GPU machine (which has no Rust
# toolchain) and copies them into .gpu-bin/ (ignored by git; a device run carries it).
#
#   tools/gpu-prepare.sh                 the CUDA tests: cuda_ops, cuda_attention,
#                                        cuda_attention_tc, cuda_train_attention, cuda_sampling,
#                                        cuda_model, cuda_graphs, cuda_kernels, cuda_train_gemm,
#                                        cuda_train_elementwise, cuda_train; and the genius-engine
#                                        binary (.gpu-bin/bin/) for the benchmarks
#   tools/gpu-prepare.sh NAME...         these integration test targets instead
#
# nvcc is used when found ($NVCC, nvcc on PATH, or the toolkit tools/compile-kernels.sh
# installs), so that the executables carry precompiled PTX and sm_90a cubins; cuda_ops still
# exercises the NVRTC path on the device. Debug info is stripped to keep the folder small.
# Then, on the GPU machine (carrying .gpu-pack): tar xzf .gpu-pack/gpu-bin.tgz &&
# bash tools/gpu-check.sh .gpu-bin
set -euo pipefail
cd "$(dirname "$0")/.."

toolkit=${GENIUS_CUDA_TOOLKIT:-$HOME/.cache/genius-engine/cuda-toolkit}
if [[ -z ${NVCC:-} ]]; then
  if command -v nvcc >/dev/null; then
    NVCC=$(command -v nvcc)
  elif [[ -x $toolkit/nvidia/cu13/bin/nvcc ]]; then
    NVCC=$toolkit/nvidia/cu13/bin/nvcc
  fi
fi
if [[ -n ${NVCC:-} ]]; then
  export NVCC
  echo "gpu-prepare: kernels precompiled with $NVCC"
else
  echo "gpu-prepare: no nvcc; the executables will compile the kernels with NVRTC on the device"
fi

tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(cuda_ops cuda_attention cuda_attention_tc cuda_train_attention cuda_sampling cuda_model cuda_graphs cuda_kernels cuda_train_gemm cuda_train_elementwise cuda_train)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done

# Built for a GPU run: the GPU tests are not ignored, and a missing device fails them. The
# bindings check is left out: it needs bindgen, which the GPU machine does not have (CI and
# this machine run it).
export GENIUS_GPU_TESTS=1 GENIUS_BINDGEN_CHECK=0
json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --no-run --message-format=json-render-diagnostics "${args[@]}" >"$json"
cargo build --release --bin genius-engine

rm -rf .gpu-bin
mkdir -p .gpu-bin
python3 - "$json" <<'PY'
import json, os, shutil, subprocess, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    name = m["target"]["name"]
    dst = os.path.join(".gpu-bin", name)
    shutil.copy2(m["executable"], dst)
    subprocess.run(["strip", "--strip-debug", dst], check=False)
    print(f"gpu-prepare: .gpu-bin/{name} ({os.path.getsize(dst) / 2**20:.1f} MiB)")
PY
mkdir -p .gpu-bin/bin
cp target/release/genius-engine .gpu-bin/bin/
strip --strip-debug .gpu-bin/bin/genius-engine
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "nvcc ${NVCC:-none}"
} >.gpu-bin/BUILD-INFO
du -sh .gpu-bin
# The device tool carries at most 64 MiB: the folder also goes packed (about a third of its
# size) into .gpu-pack/ (ignored by git); on the device: tar xzf .gpu-pack/gpu-bin.tgz first.
rm -rf .gpu-pack
mkdir -p .gpu-pack
tar czf .gpu-pack/gpu-bin.tgz .gpu-bin
du -sh .gpu-pack/gpu-bin.tgz
