#!/usr/bin/env bash
# Barrier mutation sweep for the CPU kernel emulation: removes each __syncthreads() /
# __syncwarp() of kernels/ in turn (in a copy of the tree) and reruns the emulation checks
# that cover its unit, in both one-at-a-time thread orders (tools/kernel-emu/emu.h; the
# descending one with cp.async copies landing at issue). Prints one
# line per barrier: the check group that failed, or NOT-CAUGHT (a barrier that is redundant,
# or whose path no check reaches). The sampling and loss kernels are checked through the
# inputs the kernel_emu test left under target/tmp (run `cargo test --release --test
# kernel_emu` first): their outputs must stay the clean build's, bit for bit.
#
#   tools/kernel-emu-barrier-sweep.sh [UNIT...]   (default: every unit; e.g. skinny_gemm.cu)
#
# Slow (a rebuild and a rerun per barrier: about an hour for all of kernels/ on 2 cores).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tree"
cp -r "$root/kernels" "$root/tools" "$work/tree/"
export KERNEL_EMU_DIR=$work/build
emu=$work/tree/tools/kernel-emu.sh
inputs=$root/target/tmp

# Every input of an IN OUT mode, outputs concatenated (or FAILED), in one thread order.
run_mode() {
  local mode=$1 order=$2 i
  [[ -d $inputs/kernel-emu-$mode ]] || { echo "NO-INPUTS"; return; }
  for i in $(ls "$inputs/kernel-emu-$mode" | grep '^in-' | sort -V); do
    KERNEL_EMU_ORDERS=$order timeout 300 bash "$emu" "$mode" "$inputs/kernel-emu-$mode/$i" \
      "$work/out.txt" >/dev/null 2>&1 || { echo FAILED; return; }
    cat "$work/out.txt"
  done
}
for mode in sample-rows pair-losses; do
  run_mode "$mode" ascending >"$work/clean-$mode.txt"
  if grep -q NO-INPUTS "$work/clean-$mode.txt"; then
    echo "note: no $mode inputs under $inputs (run the kernel_emu test first)" >&2
  fi
done

units=("$@")
((${#units[@]})) || units=($(cd "$root/kernels" && ls *.cu common.cuh))
for u in "${units[@]}"; do
  f=$root/kernels/$u
  [[ -f $f ]] || { echo "no kernels/$u" >&2; exit 2; }
  case $u in
    paged_attention.cu) groups="attention kv" ;;
    skinny_gemm.cu) groups="gemm" ;;
    train_gemm.cu) groups="logprobs norm elementwise" ;;
    backward.cu) groups="norm swiglu" ;;
    elementwise.cu) groups="norm elementwise kv" ;;
    attention_tc.cu | attention_backward_tc.cu | attention_backward.cu) groups="training-attention" ;;
    sampling.cu) groups="@sample-rows" ;;
    loss.cu) groups="@pair-losses" ;;
    *) groups="" ;;  # common.cuh and anything new: every group
  esac
  for line in $(grep -n "__syncthreads();\|__syncwarp();" "$f" | cut -d: -f1); do
    cp "$f" "$work/tree/kernels/$u"
    sed -i "${line}s/__syncthreads();/(void)0;/; ${line}s/__syncwarp();/(void)0;/" "$work/tree/kernels/$u"
    caught=""
    for g in ${groups:-"" @sample-rows @pair-losses}; do
      if [[ $g == @* ]]; then
        for order in ascending descending; do
          run_mode "${g#@}" "$order" >"$work/mutant.txt"
          cmp -s "$work/mutant.txt" "$work/clean-${g#@}.txt" || { caught="${g#@} ($order)"; break; }
        done
      else
        timeout 900 bash "$emu" $g >/dev/null 2>&1 || caught=${g:-all checks}
      fi
      [[ -n $caught ]] && break
    done
    cp "$f" "$work/tree/kernels/$u"
    echo "$u:$line ${caught:-NOT-CAUGHT} | $(sed -n "${line}p" "$f" | sed 's/^ *//' | cut -c1-70)"
  done
done
