#!/usr/bin/env bash
# Runs prebuilt test executables on a GPU machine, which needs no Rust toolchain: build them
# here with tools/gpu-prepare.sh (into .gpu-bin/), carry that folder to the device run, and
# there run
#
#   bash tools/gpu-check.sh [DIR]        DIR defaults to .gpu-bin
#
# Each executable's output goes to $OUT/logs/NAME.log ($OUT set by the device tool; else
# DIR/logs), plus nvidia-smi's view of the card. The kernel cache starts empty (a temporary
# $GENIUS_HOME). Printed last: a table of each executable's passed / failed / skipped tests,
# where "skipped" counts the `SKIPPED:` lines the tests printed, one per skipped test
# (libtest counts those tests as passed; they are taken out of "passed" here). Exit status 1
# when any test failed or an executable gave no result.
#
# Environment: GPU_CHECK_TIMEOUT (seconds per executable, default 300), GPU_CHECK_THREADS
# (libtest threads, default 1: readable logs).
set -uo pipefail
cd "$(dirname "$0")/.."

dir=${1:-.gpu-bin}
logs=${OUT:-$dir}/logs
mkdir -p "$logs"
[[ -d $dir ]] || { echo "gpu-check: no folder $dir (run tools/gpu-prepare.sh first)" >&2; exit 2; }

GENIUS_HOME=$(mktemp -d)
export GENIUS_HOME
trap 'rm -rf "$GENIUS_HOME"' EXIT
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$logs/nvidia-smi.txt"
[[ -f $dir/BUILD-INFO ]] && cp "$dir/BUILD-INFO" "$logs/"

rows=()
bad=0
for exe in "$dir"/*; do
  [[ -f $exe && -x $exe ]] || continue
  name=$(basename "$exe")
  log=$logs/$name.log
  start=$(date +%s)
  timeout "${GPU_CHECK_TIMEOUT:-300}" "$exe" --test-threads="${GPU_CHECK_THREADS:-1}" >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  result=$(grep -E '^test result: ' "$log" | tail -n 1)
  passed=$(sed -nE 's/.* ([0-9]+) passed;.*/\1/p' <<<"$result")
  failed=$(sed -nE 's/.* ([0-9]+) failed;.*/\1/p' <<<"$result")
  skipped=$(grep -o 'SKIPPED:' "$log" | wc -l)
  if [[ -z $passed ]]; then
    status=$([[ $rc -eq 124 ]] && echo TIMEOUT || echo "NO RESULT (exit $rc)")
    passed=-; failed=-
    bad=1
  else
    passed=$((passed > skipped ? passed - skipped : 0))
    if [[ $rc -eq 0 ]]; then status=ok; else status=FAILED; bad=1; fi
  fi
  rows+=("$(printf '%-24s %7s %7s %8s %6ss  %s' "$name" "$passed" "$failed" "$skipped" "$secs" "$status")")
done

[[ ${#rows[@]} -gt 0 ]] || { echo "gpu-check: no executables in $dir" >&2; exit 2; }
echo
echo "gpu-check: $(nvidia-smi -L 2>/dev/null | head -n 1 | grep . || echo 'no GPU seen by nvidia-smi')"
echo "gpu-check: logs in $logs"
printf '%-24s %7s %7s %8s %7s  %s\n' "test binary" passed failed skipped time status
printf '%s\n' "${rows[@]}"
exit $bad
