#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's `dataset-fashion-mnist` package (when
# /usr/share/datasets/fashion-mnist/ lacks it), copy the four gzipped IDX files into
# datasets/fashion-mnist/ (git-ignored), and rebuild the committed 2000/500 slice
# datasets/fashion-mnist-small/ with scripts/make-fashion-mnist-small.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src=/usr/share/datasets/fashion-mnist
files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

missing=0
for f in "${files[@]}"; do
  [ -f "$src/$f.gz" ] || missing=1
done
if [ "$missing" = 1 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
else
  echo "found $src"
fi
echo "dataset-fashion-mnist $(dpkg-query -W -f='${Version}' dataset-fashion-mnist 2>/dev/null || echo '(version unknown)')"

out="$root/datasets/fashion-mnist"
mkdir -p "$out"
for f in "${files[@]}"; do
  if cmp -s "$src/$f.gz" "$out/$f.gz"; then
    echo "  up to date  $f.gz"
  else
    cp "$src/$f.gz" "$out/$f.gz"
    echo "  copied      $f.gz ($(wc -c <"$out/$f.gz") bytes)"
  fi
done
echo "Fashion-MNIST is in $out"
python3 "$root/scripts/make-fashion-mnist-small.py" "$out" "$root/datasets/fashion-mnist-small"
