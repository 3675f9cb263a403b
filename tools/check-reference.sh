#!/usr/bin/env bash
# Scores examples/score.jsonl with the engine (release build, default model) and checks every
# per-token log-prob against tools/reference_logprobs.py, an independent float64 numpy
# implementation on llama.cpp's own GGUF reader. Python packages go into a venv under
# $GENIUS_HOME (default ~/.cache/genius-engine). Usage: tools/check-reference.sh [INPUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
input=${1:-examples/score.jsonl}
home=${GENIUS_HOME:-$HOME/.cache/genius-engine}
venv=$home/reference-venv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tools/requirements-reference.txt
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --release --quiet -- score --device cpu --input "$input" --output "$out/scores.jsonl"
gguf=$(cargo run --release --quiet -- info --json | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["path"])')
"$venv/bin/python" tools/reference_logprobs.py --gguf "$gguf" --scored "$out/scores.jsonl" --tol 1e-3
