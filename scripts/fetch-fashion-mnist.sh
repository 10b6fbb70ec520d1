#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's `dataset-fashion-mnist` package into
# datasets/fashion-mnist/ (git-ignored) and rebuild the committed 2000/500 slice
# datasets/fashion-mnist-small/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src=/usr/share/datasets/fashion-mnist
if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist
fi
out="$root/datasets/fashion-mnist"
mkdir -p "$out"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  cp "$src/$f.gz" "$out/$f.gz"
done
echo "copied Fashion-MNIST ($(du -sh "$out" | cut -f1)) to $out"
python3 "$root/scripts/make-fashion-mnist-small.py" "$out" "$root/datasets/fashion-mnist-small"
