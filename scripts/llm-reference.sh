#!/usr/bin/env bash
# transformers' reference outputs for tests/pretrained.rs (scripts/llm_reference.py),
# made once per version of the script and its inputs and cached in
# $KILN_CACHE/llm-reference, then copied beside each GGUF as reference.json.
# Needs the models (scripts/fetch-llms.sh) and the Python environment of
# scripts/setup-torch-cpu.sh with transformers (scripts/fetch-minilm.sh --torch installs
# it); adds gguf, sentencepiece and accelerate to it (the environment the references were
# made in; accelerate with --no-deps, so that pip does not pull the CUDA wheels back in).
#   scripts/llm-reference.sh [smollm2|gemma3]...   (default: both)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
[ -x "$py" ] || { echo "no Python environment at $py: run scripts/setup-torch-cpu.sh" >&2; exit 1; }
if ! "$py" -c 'import gguf, accelerate, sentencepiece, transformers' 2>/dev/null; then
  "$py" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache/pip" gguf==0.19.0 sentencepiece==0.2.3
  "$py" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache/pip" --no-deps accelerate==1.15.0
fi
declare -A DIR=([smollm2]=smollm2-135m-instruct [gemma3]=gemma-3-270m)
key=$(cat scripts/llm_reference.py tests/fixtures/tokenizer-varied.txt datasets/shakespeare-poems/*.txt \
  datasets/shakespeare/*.txt | sha256sum | cut -c1-16)
mkdir -p "$cache/llm-reference"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 gemma3)
for m in "${models[@]}"; do
  cached="$cache/llm-reference/$m-$key.json"
  out="datasets/pretrained/${DIR[$m]}/reference.json"
  if [ ! -f "$cached" ]; then
    start=$(date +%s)
    "$py" scripts/llm_reference.py "$m" 2> "$cache/llm-reference/$m.log" || { cat "$cache/llm-reference/$m.log" >&2; exit 1; }
    cp "$out" "$cached.tmp" && mv "$cached.tmp" "$cached"
    echo "transformers' reference for $m made in $(( $(date +%s) - start )) s"
  fi
  cmp -s "$cached" "$out" 2>/dev/null || cp "$cached" "$out"
  echo "transformers' reference for $m is in $out"
done
