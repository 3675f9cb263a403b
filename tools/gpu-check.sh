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
# Then, when DIR/bin/genius-engine is there (tools/gpu-prepare.sh puts it there), the
# benchmarks: `bench rollout --device cuda` on random weights of Qwen2.5-0.5B's shape (prompt
# 128, 256 new tokens, 64 / 256 / 512 sequences, and one prompt forked 8 ways), `bench
# forward`, `bench gemm` (the layer GEMMs' device time: cuBLASLt's heuristic and tuned
# algorithms, the skinny split-K kernels), and right after them the HF transformers peer
# (tools/peer_hf_generate.py), which also measures the device copy ceiling; their logs go
# beside the tests' and a throughput table (tokens/s, ratio to the peer, achieved GB/s
# against the ceiling) is printed last.
#
# Training (GPU_TRAIN=0 skips it): `bench train --device cuda` (8 sequences x 1024 tokens of
# the same model: tokens/s, model FLOP utilisation against a GEMM ceiling measured in the same
# process, device memory) and right after it the PyTorch peer (tools/peer_torch_train.py);
# then a 2-round `genius-engine run --device cuda` on the same random model (4 queries, the
# quick profile), whose summary goes in the table; and `bench logprobs` (the fused log-prob
# gathering, forward and backward, at 1k / 4k / 16k rows: GB/s and device memory), and a
# `bench train` of Qwen2.5-3B's shape (GPU_TRAIN_3B=0 skips it): does a full step fit 80 GB.
#
# Environment: GPU_CHECK_TIMEOUT (seconds per executable, default 300), GPU_CHECK_THREADS
# (libtest threads, default 1: readable logs), GPU_BENCH=0 (tests only), GPU_BENCH_BATCHES
# (default 64,256,512), GPU_BENCH_MODEL (default random:qwen2.5-0.5b), GPU_PEER=0 (no peer),
# GPU_ROLLOUT=0 (no rollout benchmarks), GPU_TRAIN=0 (no training benchmarks and run),
# GPU_TRAIN_PROFILE=1 (also a `bench train` with GENIUS_CUDA_PROFILE=1: GPU time per kernel),
# GPU_TRAIN_VARIANTS=0 (no `bench train` A/B runs: the attention backward's newer paths off,
# cuBLASLt algorithms timed per shape),
# GPU_CHECK_BUDGET (seconds: past it, the optional parts above are skipped, each with a line
# saying so).
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
[[ -f $dir/BUILD-INFO ]] && sed 's/^/gpu-check: built: /' "$dir/BUILD-INFO"

rows=()
bad=0
t0=$(date +%s)
# Optional parts (A/B variants, the profile, the 3B step) run only while fewer than
# GPU_CHECK_BUDGET seconds have passed since the start (default: no limit), so that a run on a
# device with little time left still gets the tests, the main benchmarks and the peers.
within_budget() {
  local spent=$(($(date +%s) - t0))
  if [[ -n ${GPU_CHECK_BUDGET:-} && $spent -ge $GPU_CHECK_BUDGET ]]; then
    echo "== skipped: $1 (${spent}s spent, GPU_CHECK_BUDGET=${GPU_CHECK_BUDGET}s)"
    return 1
  fi
  return 0
}
# Runs one test executable (with the environment settings given after it), adds its row.
run_tests() {
  local exe=$1 name=$2
  shift 2
  local log=$logs/$name.log start rc secs result passed failed skipped status
  start=$(date +%s)
  env "$@" timeout "${GPU_CHECK_TIMEOUT:-300}" "$exe" --test-threads="${GPU_CHECK_THREADS:-1}" --nocapture >"$log" 2>&1
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
}
for exe in "$dir"/*; do
  [[ -f $exe && -x $exe ]] || continue
  run_tests "$exe" "$(basename "$exe")"
done
# The training GEMMs again with cuBLASLt's algorithms timed per shape (GENIUS_CUDA_GEMM_TUNE=1,
# opt-in: the tuned choice must still match the CPU).
if [[ -x $dir/cuda_train_gemm ]] && within_budget "cuda_train_gemm with GENIUS_CUDA_GEMM_TUNE=1"; then
  run_tests "$dir/cuda_train_gemm" "cuda_train_gemm+tune" GENIUS_CUDA_GEMM_TUNE=1
fi

[[ ${#rows[@]} -gt 0 ]] || { echo "gpu-check: no executables in $dir" >&2; exit 2; }

engine=$dir/bin/genius-engine
bench_table=""
if [[ -x $engine && ${GPU_BENCH:-1} != 0 ]]; then
  model=${GPU_BENCH_MODEL:-random:qwen2.5-0.5b}
  [[ ${GPU_ROLLOUT:-1} != 0 ]] && {
    echo "== bench rollout"
    timeout "${GPU_BENCH_TIMEOUT:-180}" "$engine" bench rollout --device cuda --model "$model" --tokens 128 \
      --new-tokens 256 --batches "${GPU_BENCH_BATCHES:-64,256,512}" --forks 8
    rc=$?
    echo "rc-rollout $rc"
    if [[ $rc -ne 0 ]]; then
      # Decode CUDA graphs are the newest part of the step: a failure there must not cost the
      # run its decode numbers. The same benchmark without them (the failure still counts:
      # its "rc-rollout" line is not 0; this one's is "rc-fallback").
      echo "== bench rollout"
      echo "(rerun with GENIUS_CUDA_GRAPHS=0 after the failure above)"
      GENIUS_CUDA_GRAPHS=0 timeout "${GPU_BENCH_TIMEOUT:-180}" "$engine" bench rollout --device cuda \
        --model "$model" --tokens 128 --new-tokens 256 --batches "${GPU_BENCH_BATCHES:-64,256,512}" \
        --forks 8
      echo "rc-fallback $?"
    fi
    echo "== bench forward"
    timeout 60 "$engine" bench forward --device cuda --model "$model" --tokens 2048 --iters 5
    echo "rc $?"
    if [[ ${GPU_BENCH_VARIANTS:-1} != 0 ]]; then
      # A/B at shorter settings, most telling first (the budget may cut the tail): the
      # baseline, paged attention on the CUDA cores, cuBLASLt algorithms timed per shape, the
      # skinny split-K GEMM kernels instead of cuBLASLt, without CUDA graphs, where a step's GPU time goes (the profile runs without graphs),
      # without the pool and upload savings.
      for variant in ${GPU_BENCH_VARIANT_LIST:-BASELINE=same-settings GENIUS_CUDA_PA_TC=0 GENIUS_CUDA_GEMM_TUNE=1 GENIUS_CUDA_SKINNY_GEMM=1 GENIUS_CUDA_GRAPHS=0 GENIUS_CUDA_PROFILE=1 GENIUS_CUDA_POOL_KEEP=0 GENIUS_CUDA_MEMO=0}; do
        within_budget "variant $variant" || continue
        echo "== variant $variant"
        env "$variant" timeout 90 "$engine" bench rollout --device cuda --model "$model" \
          --tokens 128 --new-tokens 128 --batches 64,256 --forks 0
        echo "rc $?"
      done
    fi
    # The layer GEMMs alone (device time per call), with the heuristic's and the tuned
    # algorithms: what decode and training get from cuBLASLt at their row counts.
    for variant in BASELINE=heuristic GENIUS_CUDA_GEMM_TUNE=1 GENIUS_CUDA_SKINNY_GEMM=1; do
      within_budget "bench gemm $variant" || continue
      echo "== bench gemm $variant"
      env "$variant" timeout 90 "$engine" bench gemm --device cuda --model "$model" --iters 50
      echo "rc-gemm $?"
    done
  } >"$logs/bench.log" 2>&1
  # The main decode benchmark must have passed (the variants' and the forward's lines are
  # their own).
  [[ ${GPU_ROLLOUT:-1} == 0 ]] || grep -q '^rc-rollout 0' "$logs/bench.log" || bad=1
  if [[ ${GPU_TRAIN:-1} != 0 ]]; then
    {
      echo "== bench train"
      timeout "${GPU_TRAIN_TIMEOUT:-180}" "$engine" bench train --device cuda --model "$model" \
        --tokens 1024 --batches 4 --iters 5
      echo "rc $?"
      if [[ ${GPU_TRAIN_PROFILE:-0} != 0 ]] && within_budget "bench train, profiled"; then
        echo "== bench train, profiled"
        GENIUS_CUDA_PROFILE=1 timeout 120 "$engine" bench train --device cuda --model "$model" \
          --tokens 1024 --batches 4 --iters 2
        echo "rc-profile $?"
      fi
      if [[ ${GPU_TRAIN_VARIANTS:-1} != 0 ]]; then
        # A/B of the attention backward's newer paths (shorter runs, the same shape).
        for variant in GENIUS_CUDA_ATTN_BWD_SPLIT=0 GENIUS_CUDA_ATTN_BWD_STATS=0 GENIUS_CUDA_GEMM_TUNE=1; do
          within_budget "train variant $variant" || continue
          echo "== train variant $variant"
          env "$variant" timeout 120 "$engine" bench train --device cuda --model "$model" \
            --tokens 1024 --batches 4 --iters 3
          echo "rc-variant $?"
        done
      fi
      if [[ ${GPU_TRAIN_3B:-1} != 0 ]] && within_budget "bench train 3b"; then
        echo "== bench train 3b"
        timeout 240 "$engine" bench train --device cuda --model random:qwen2.5-3b \
          --tokens 1024 --batches 4 --iters 2
        echo "rc-3b $?"
      fi
      echo "== bench logprobs"
      timeout 120 "$engine" bench logprobs --device cuda --model "$model" --batches 1024,4096,16384 --iters 5
      echo "rc-logprobs $?"
      # A/B: the chunks' softmax passes on the main stream; cuBLASLt algorithms timed.
      for variant in GENIUS_CUDA_LOGPROB_OVERLAP=0 GENIUS_CUDA_GEMM_TUNE=1; do
        within_budget "logprobs variant $variant" || continue
        echo "== logprobs variant $variant"
        env "$variant" timeout 90 "$engine" bench logprobs --device cuda --model "$model" \
          --batches 4096,16384 --iters 5
        echo "rc-logprobs-variant $?"
      done
      echo "== run"
      rm -rf "$GENIUS_HOME/run"
      timeout "${GPU_TRAIN_TIMEOUT:-180}" "$engine" run --device cuda --model "$model" --rounds 2 \
        --limit 4 --out "$GENIUS_HOME/run"
      echo "rc $?"
      [[ -f $GENIUS_HOME/run/summary.json ]] && { printf 'run summary '; tr -d '\n' <"$GENIUS_HOME/run/summary.json"; echo; }
    } >"$logs/train.log" 2>&1
    [[ $(grep -c '^rc 0' "$logs/train.log") -eq 2 ]] || bad=1
    if [[ ${GPU_PEER:-1} != 0 ]]; then
      PYTHONUNBUFFERED=1 timeout 180 python3 tools/peer_torch_train.py --pairs 4 --tokens 1024 \
        >"$logs/peer-train.log" 2>&1 || echo "peer failed: $?" >>"$logs/peer-train.log"
    fi
  fi
  if [[ ${GPU_PEER:-1} != 0 && ${GPU_ROLLOUT:-1} != 0 ]]; then
    PYTHONUNBUFFERED=1 timeout 180 python3 tools/peer_hf_generate.py --batches 64,256 \
      --prompt 128 --new-tokens 256 >"$logs/peer.log" 2>&1 || echo "peer failed: $?" >>"$logs/peer.log"
  fi
  bench_table=$(python3 - "$logs/bench.log" "$logs/peer.log" "$logs/train.log" "$logs/peer-train.log" <<'PY'
import json, sys
def sections(path):
    """(header, [parsed JSON lines]) per '== ' section of a log."""
    out, cur = [], ("", [])
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("== "):
            cur = (line[3:], [])
            out.append(cur)
        elif line.startswith("{"):
            try:
                cur[1].append(json.loads(line))
            except ValueError:
                pass
    return out
secs = sections(sys.argv[1])
def first(name, key, value):
    for h, objs in secs:
        if h == name:
            for o in objs:
                if o.get(key) == value:
                    return o
    return None
bench = first("bench rollout", "bench", "rollout")
fwd = first("bench forward", "bench", "forward")
variants = [(h, next((o for o in objs if o.get("bench") == "rollout"), None)) for h, objs in secs if h.startswith("variant ")]
peer = next((o for h, objs in sections(sys.argv[2]) for o in objs if "peer" in o), None)
if peer is None:
    try:
        for line in open(sys.argv[2]):
            if line.startswith("{") and '"peer"' in line:
                peer = json.loads(line)
    except OSError:
        pass
ceiling = peer.get("copy_ceiling_gb_s") if peer else None
peer_rate = {b["sequences"]: b["tokens_per_s"] for b in (peer or {}).get("batches", [])}
out = []
if bench is None:
    out.append("bench rollout: no result (see bench.log)")
else:
    out.append(f"rollout on {bench['device']}, {bench['model']}, prompt {bench['prompt_tokens']} + {bench['new_tokens']} new")
    if "rc-fallback" in open(sys.argv[1]).read():
        out.append("  (the run with CUDA graphs FAILED: these numbers are its rerun with GENIUS_CUDA_GRAPHS=0)")
    out.append(f"{'sequences':>9} {'decode tok/s':>13} {'step ms':>8} {'host ms':>8} {'stops ms':>8} {'GB/s':>7} {'% copy':>7} {'HF tok/s':>9} {'x HF':>6}  graphs (replayed/eager steps)")
    for b in bench["batches"]:
        n = b["sequences"]
        pct = f"{100 * b['achieved_gb_s'] / ceiling:6.1f}%" if ceiling else "      -"
        hf = peer_rate.get(n)
        ratio = f"{b['decode_tokens_per_s'] / hf:6.1f}" if hf else "     -"
        hfs = f"{hf:9.0f}" if hf else "        -"
        g = b.get("graphs") or {}
        gs = f"{g.get('replays', '-')}/{g.get('eager_steps', '-')}" + (f" off: {g['off']}" if g.get("off") else "")
        host = f"{b['host_ms_per_step']:8.3f}" if "host_ms_per_step" in b else "       -"
        stops = f"{b['accept_ms_per_step']:8.3f}" if "accept_ms_per_step" in b else "       -"
        out.append(f"{n:>9} {b['decode_tokens_per_s']:>13.0f} {b['decode_step_ms']:>8.2f} {host} {stops} {b['achieved_gb_s']:>7.0f} {pct:>7} {hfs} {ratio}  {gs}")
    f = bench.get("foresight")
    if f:
        out.append(f"foresight: {f['forks']} forks of {f['prompt_tokens']} tokens: {f['blocks_used']} KV blocks used, {f['blocks_shared']} shared ({f['blocks_without_sharing']} without sharing), {f['seconds']:.2f}s")
if fwd:
    out.append(f"prefill {fwd['tokens']} tokens: {fwd['tokens_per_s']:.0f} tokens/s")
# Per row count, the layer GEMMs' time per layer; the variants beside the heuristic's.
gemm_base = {}
for h, objs in secs:
    if h.startswith("bench gemm "):
        g = next((o for o in objs if o.get("bench") == "gemm"), None)
        if not g:
            out.append(f"{h}: no result")
            continue
        by_rows = {}
        for r in g["results"]:
            by_rows.setdefault(r["rows"], []).append(r)
        for n, rs in sorted(by_rows.items()):
            layer = [r for r in rs if r["gemm"] != "lm_head"]
            us = sum(r["us_per_call"] for r in layer)
            name = h[len('bench gemm '):]
            if name == "BASELINE=heuristic":
                gemm_base[n] = us
                vs = ""
            else:
                vs = f" ({gemm_base[n] / us:.2f}x the heuristic's speed)" if gemm_base.get(n) and us > 0 else ""
            parts = ", ".join(f"{r['gemm']} {r['us_per_call']:.1f} us ({r['gb_s']:.0f} GB/s, {r['tflop_s']:.0f} TF/s)" for r in rs)
            out.append(f"gemm {name} {n} rows: layer {us:.1f} us{vs}; {parts}")
# Each A/B variant beside the same-settings baseline (tokens/s ratio per batch): the evidence
# for a switch's default.
base = next((v for h, v in variants if h == "variant BASELINE=same-settings"), None)
base_rate = {b["sequences"]: b["decode_tokens_per_s"] for b in (base or {}).get("batches", [])}
for h, v in variants:
    if v:
        def rate(b):
            r = f"{b['sequences']}: {b['decode_tokens_per_s']:.0f} tok/s ({b['decode_step_ms']:.2f} ms/step"
            ref = base_rate.get(b["sequences"])
            if ref and v is not base:
                r += f", {b['decode_tokens_per_s'] / ref:.2f}x baseline"
            return r + ")"
        out.append(f"{h[8:]}: " + ", ".join(rate(b) for b in v["batches"]))
    else:
        out.append(f"{h[8:]}: no result")
# The switches ranked at the largest batch the baseline ran (a ratio above 1 favours the
# variant's setting; compare with the baseline's own run-to-run spread before acting).
if base_rate:
    top = max(base_rate)
    ranked = sorted(((b["decode_tokens_per_s"] / base_rate[top], h[8:]) for h, v in variants if v and v is not base
                     for b in v["batches"] if b["sequences"] == top), reverse=True)
    if ranked:
        out.append(f"A/B at {top} sequences: " + ", ".join(f"{name} {r:.2f}x" for r, name in ranked))
for h, _ in secs + sections(sys.argv[3]):
    if h.startswith("skipped: "):
        out.append(h)
if ceiling:
    out.append(f"device copy ceiling (torch, read + write): {ceiling:.0f} GB/s")
elif peer is None and bench is not None:
    out.append("peer: no result (see peer.log)")
# Training: the engine's step, the torch peer's, the 2-round run.
tsecs = sections(sys.argv[3])
train = next((o for h, objs in tsecs if h == "bench train" for o in objs if o.get("bench") == "train"), None)
tpeer = None
try:
    for line in open(sys.argv[4]):
        if line.startswith("{") and '"torch-train"' in line:
            tpeer = json.loads(line)
except OSError:
    pass
if train:
    mfu = f", MFU {100 * train['mfu']:.1f}% of {train['gemm_ceiling_tflops']:.0f} TFLOP/s" if train.get("mfu") else ""
    mem = f", {train['device_memory_used_bytes'] / 2**30:.1f} GiB in use" if train.get("device_memory_used_bytes") else ""
    out.append(f"train step {2 * train['pairs_per_step']} x {train['tokens_per_sequence']} tokens: {train['median_tokens_per_s']:.0f} tokens/s{mfu}{mem}")
elif any(h == "bench train" for h, _ in tsecs):
    out.append("bench train: no result (see train.log)")
for h, objs in tsecs:
    if h.startswith("train variant "):
        tv = next((o for o in objs if o.get("bench") == "train"), None)
        out.append(f"train {h[len('train variant '):]}: " + (f"{tv['median_tokens_per_s']:.0f} tokens/s" if tv else "no result"))
t3 = next((o for h, objs in tsecs if h == "bench train 3b" for o in objs if o.get("bench") == "train"), None)
if t3:
    mem = f"{t3['device_memory_used_bytes'] / 2**30:.1f} GiB in use" if t3.get("device_memory_used_bytes") else "memory unknown"
    out.append(f"Qwen2.5-3B shape, full ACO step of {2 * t3['pairs_per_step']} x {t3['tokens_per_sequence']} tokens: fits, {mem}, recompute {'on' if t3.get('recompute') else 'off'}, {t3['median_tokens_per_s']:.0f} tokens/s")
elif any(h == "bench train 3b" for h, _ in tsecs):
    out.append("Qwen2.5-3B shape: no result (see train.log: did not fit or failed)")
lp = next((o for h, objs in tsecs if h == "bench logprobs" for o in objs if o.get("bench") == "logprobs"), None)
if lp:
    for r in lp["results"]:
        pct = f" ({100 * r['forward_gb_s'] / ceiling:.0f}% / {100 * r['backward_gb_s'] / ceiling:.0f}% of copy)" if ceiling else ""
        mem = f", {r['device_memory_used_bytes'] / 2**30:.2f} GiB in use" if r.get("device_memory_used_bytes") else ""
        one = f", 1-pass bwd {r['one_pass_backward_ms']:.2f} ms {r['one_pass_backward_gb_s']:.0f} GB/s" if r.get("one_pass_backward_ms") is not None else ""
        out.append(f"log-probs {r['rows']} rows x {lp['vocab']}: fwd {r['forward_ms']:.2f} ms {r['forward_gb_s']:.0f} GB/s, bwd {r['backward_ms']:.2f} ms {r['backward_gb_s']:.0f} GB/s{one}{pct}{mem}")
for h, objs in tsecs:
    if h.startswith("logprobs variant "):
        lv = next((o for o in objs if o.get("bench") == "logprobs"), None)
        res = ", ".join(f"{r['rows']} rows fwd {r['forward_ms']:.2f} ms / bwd {r['backward_ms']:.2f} ms" for r in lv["results"]) if lv else "no result"
        out.append(f"log-probs {h[len('logprobs variant '):]}: {res}")
if tpeer:
    ratio = f" -> engine {train['median_tokens_per_s'] / tpeer['tokens_per_s']:.2f}x torch" if train else ""
    out.append(f"torch peer train step: {tpeer['tokens_per_s']:.0f} tokens/s, peak {tpeer['peak_gib']:.1f} GiB{ratio}")
try:
    for line in open(sys.argv[3]):
        if line.startswith("run summary "):
            r = json.loads(line[len("run summary "):])
            parts = []
            for rd in r.get("rounds", []):
                lf, ll = rd.get("loss_first"), rd.get("loss_last")
                loss = f"loss {lf:.4f} -> {ll:.4f}" if lf is not None and ll is not None else "no loss"
                parts.append(f"round {rd.get('round')}: {rd.get('pairs')} pairs, {rd.get('sample_tokens_per_s') or 0:.0f} sample tok/s, {loss}")
            out.append(f"run --device cuda, {len(r.get('rounds', []))} rounds in {r.get('seconds', 0):.1f}s: " + "; ".join(parts))
except (OSError, ValueError):
    pass
print("\n".join(out))
PY
)
fi
echo
echo "gpu-check: $(nvidia-smi -L 2>/dev/null | head -n 1 | grep . || echo 'no GPU seen by nvidia-smi')"
echo "gpu-check: logs in $logs"
printf '%-24s %7s %7s %8s %7s  %s\n' "test binary" passed failed skipped time status
printf '%s\n' "${rows[@]}"
[[ -n $bench_table ]] && printf '\n%s\n' "$bench_table"
exit $bad
