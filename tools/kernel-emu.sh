#!/usr/bin/env bash
# Runs the kernels of kernels/ on the CPU: compiles their real source with a host C++ compiler
# and tools/kernel-emu/emu.h (threads for CUDA threads, barriers for __syncthreads and warp
# shuffles, the tensor-core mma.sync and ldmatrix emulated per warp), links
# tools/kernel-emu/checks.cpp (float64 references) and runs it, once with a block's threads
# one at a time in ascending rank order and once in descending (side by side), so that a
# missing barrier shows in one of them (tools/kernel-emu/emu.h); every shared variable starts
# as garbage in each block (see the __shared__ rewrite below), and the `emulator` group checks
# these guarantees themselves (tools/kernel-emu/selftest.cu). No GPU or CUDA toolkit needed;
# tests/kernel_emu.rs runs this as part of `cargo test`. optim.cu's casts are checked here, its
# AdamW update by tests/kernel_emu.rs (the `adamw` mode, bit for bit against the host's AdamW).
#
#   tools/kernel-emu.sh [attention|logprobs|gemm|swiglu|kv|norm|elementwise|training-attention|emulator]
#                                        (default: every check)
#   tools/kernel-emu.sh pair-losses IN OUT   the loss kernel on IN's inputs (tests/kernel_emu.rs)
#   tools/kernel-emu.sh sample-rows IN OUT   the sampling kernel on IN's rows (tests/kernel_emu.rs)
#   tools/kernel-emu.sh sampling-exp IN OUT  the sampling exponential on IN's values (same)
#   tools/kernel-emu.sh adamw IN OUT         the AdamW update on IN's tensors (same)
#
# KERNEL_EMU_ORDERS: the thread orders to run (default "ascending descending:issue";
# "parallel" runs a block's threads as concurrent OS threads). An order may end in ":issue"
# (cp.async copies land when issued, the earliest the device may) or ":wait" (at the wait, the
# latest; the default): the ascending run lands them late, the descending run early, so a
# missing wait and a refill that races other threads' reads (tools/kernel-emu/emu.h) both
# show. The IN OUT modes run in the first order only.
# Uses $CXX, else g++, else clang++ (C++20: std::barrier). Build products go to
# ${KERNEL_EMU_DIR:-target/kernel-emu}.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${KERNEL_EMU_DIR:-$root/target/kernel-emu}
cxx=${CXX:-}
if [[ -z $cxx ]]; then
  for c in g++ clang++ c++; do
    if command -v "$c" >/dev/null; then cxx=$c; break; fi
  done
fi
if [[ -z $cxx ]]; then
  echo "kernel-emu: no C++ compiler (set CXX, or install g++)" >&2
  exit 2
fi
mkdir -p "$out"
flags=(-std=c++20 -O2 -ffp-contract=off -pthread -DGE_KERNEL_EMU -Wall -Wno-unused-function -Wno-unknown-pragmas)
# The fibers' own context switch (emu.h) returns into frames that were never called: no
# shadow stacks.
[[ $(uname -m) == x86_64 ]] && flags+=(-fcf-protection=none)
units=(paged_attention train_gemm elementwise backward attention_tc attention_backward_tc attention_backward loss sampling skinny_gemm optim selftest)
objs=()
# Each unit is compiled from a copy whose `__shared__ T name[dims];` declarations read
# GE_EMU_SHARED(T, name, [dims]) (emu.h: the variable is poisoned at each block); line numbers
# and the file name stay the original's. A declaration of another form stops the build.
# Headers are not rewritten: none may declare a __shared__ variable (the dynamic shared memory
# macro's device branch aside).
if grep -nE '^([^/]|/[^/])*__shared__' "$root"/kernels/*.cuh "$root"/kernels/*.h "$root/tools/kernel-emu/selftest.h" |
    grep -v 'define GE_DYNAMIC_SHARED(type, name) extern __shared__'; then
  echo "kernel-emu: a __shared__ declaration in a header (the emulation only rewrites the units' own)" >&2
  exit 2
fi
shared_decl='^([[:space:]]*)__shared__[[:space:]]+((__align__\([0-9]+\)[[:space:]]+)?((unsigned|long|signed)[[:space:]]+)*[A-Za-z_][A-Za-z_0-9]*)[[:space:]]+([A-Za-z_][A-Za-z_0-9]*)((\[[^]]*\])*)[[:space:]]*;'
for u in "${units[@]}"; do
  obj=$out/$u.o
  # The emulation's own self-test kernels live beside it.
  orig=$root/kernels/$u.cu
  [[ $u == selftest ]] && orig=$root/tools/kernel-emu/selftest.cu
  # Rebuilt when the unit, the shared headers or the emulation changed.
  if [[ ! -f $obj || $orig -nt $obj || $root/kernels/common.cuh -nt $obj ||
        $root/kernels/args.h -nt $obj || $root/tools/kernel-emu/emu.h -nt $obj ||
        $root/tools/kernel-emu/selftest.h -nt $obj || $root/tools/kernel-emu.sh -nt $obj ]]; then
    src=$out/$u.emu.cu
    { echo "#line 1 \"$orig\""
      sed -E "s/$shared_decl/\1GE_EMU_SHARED(\2, \6, \7);/" "$orig"; } >"$src"
    # (outside comments)
    if grep -nE '^([^/]|/[^/])*__shared__' "$src" | grep -v '^1:'; then
      echo "kernel-emu: $orig: a __shared__ declaration of a form the emulation does not rewrite (one variable per declaration, no initialiser)" >&2
      exit 2
    fi
    "$cxx" "${flags[@]}" -I "$root/kernels" -include "$root/tools/kernel-emu/emu.h" -x c++ -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done
# The checks binary: relinked when checks.cpp, the headers or any unit's object changed (the
# IN OUT modes run it once per input file).
relink=0
for dep in "$root/tools/kernel-emu/checks.cpp" "$root/tools/kernel-emu/emu.h" "$root/kernels/args.h" "${objs[@]}"; do
  [[ ! -f $out/checks || $dep -nt $out/checks ]] && relink=1
done
if ((relink)); then
  "$cxx" "${flags[@]}" -DGE_EMU_MAIN -include "$root/tools/kernel-emu/emu.h" "$root/tools/kernel-emu/checks.cpp" "${objs[@]}" -o "$out/checks"
fi
# The thread orders (tools/kernel-emu/emu.h): by default both one-at-a-time orders, each a
# single OS thread, run side by side; KERNEL_EMU_ORDERS="parallel" (or any list) to choose.
read -r -a orders <<<"${KERNEL_EMU_ORDERS:-ascending descending:issue}"
case ${1:-} in
  pair-losses | sample-rows | sampling-exp | adamw) orders=("${orders[0]}") ;;
esac
# One order's environment: GE_EMU_ORDER and GE_EMU_ASYNC from "order[:landing]".
order_env() {
  local landing=wait
  [[ $1 == *:* ]] && landing=${1#*:}
  echo "GE_EMU_ORDER=${1%%:*} GE_EMU_ASYNC=$landing"
}
if ((${#orders[@]} == 1)); then
  exec env $(order_env "${orders[0]}") "$out/checks" "$@"
fi
pids=()
for o in "${orders[@]}"; do
  env $(order_env "$o") "$out/checks" "$@" >"$out/run-${o/:/-}.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!orders[@]}"; do
  wait "${pids[$i]}" || rc=1
  echo "== thread order: ${orders[$i]}"
  o=${orders[$i]}
  cat "$out/run-${o/:/-}.log"
done
exit $rc
