#!/usr/bin/env bash
# Backend comparison in one command: each backend and PyTorch eager on the same models and
# batches, interleaved, each measurement in a fresh process (benches/compare_backends.rs):
#   scripts/compare-backends.sh [--config configs/X.toml]... [--backends flex,ndarray,tch,wgpu]
#                               [--rounds 3] [--warmup 10] [--steps 50] [--threads N]
#                               [--out runs/compare-backends] [--no-torch]
# Default configs: the nanoGPT CPU recipe (configs/shakespeare-char.toml), its llama twin
# and the Fashion-MNIST CNN. Writes <out>/compare-backends.{md,json,png} and prints the
# table: training ms/step and tokens (images)/s, first-step latency, forward-only ms,
# KV-cached decode tokens/s, peak RSS, and throughput ratios to PyTorch eager.
# Sets up what the chosen backends need: libtorch (scripts/setup-libtorch.sh, unless
# LIBTORCH is set), Vulkan (scripts/setup-vulkan.sh), the PyTorch venv
# (scripts/setup-torch-cpu.sh, unless KILN_PYTHON names an interpreter with torch) and the
# full Fashion-MNIST (scripts/fetch-fashion-mnist.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
backends="flex,ndarray,tch,wgpu"
configs=()
pass=()
torch=1
while [ $# -gt 0 ]; do
  case "$1" in
    --backends) backends="$2"; shift 2 ;;
    --config) configs+=(--config "$2"); shift 2 ;;
    --rounds|--warmup|--steps|--threads|--out) pass+=("$1" "$2"); shift 2 ;;
    --no-torch) torch=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ${#configs[@]} -eq 0 ]; then
  configs=(--config configs/shakespeare-char.toml --config configs/shakespeare-llama.toml
           --config configs/fashion-mnist-cnn.toml)
fi
features=()
case ",$backends," in *,tch,*|*,tch-cuda,*) features+=(tch) ;; esac
case ",$backends," in *,wgpu,*) features+=(wgpu) ;; esac
if [[ " ${features[*]} " == *" tch "* ]] && [ -z "${LIBTORCH:-}" ]; then
  scripts/setup-libtorch.sh
  export LIBTORCH="$root/third_party/libtorch"
fi
if [[ " ${features[*]} " == *" wgpu "* ]]; then
  scripts/setup-vulkan.sh
fi
if [[ " ${configs[*]} " == *fashion-mnist* ]] && [ ! -f datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  scripts/fetch-fashion-mnist.sh
fi
torch_args=()
if [ "$torch" = 1 ]; then
  venv="${KILN_VENV:-$root/.venv}"  # where scripts/setup-torch-cpu.sh puts it
  python="${KILN_PYTHON:-$venv/bin/python}"
  if ! "$python" -c "import torch" 2>/dev/null; then
    scripts/setup-torch-cpu.sh --stubs
    python="$venv/bin/python"
  fi
  torch_args=(--torch "$python")
fi
feature_args=()
if [ ${#features[@]} -gt 0 ]; then
  feature_args=(--features "$(IFS=,; echo "${features[*]}")")
fi
exec cargo bench --bench compare_backends "${feature_args[@]}" -- \
  --backends "$backends" "${configs[@]}" "${torch_args[@]}" "${pass[@]}"
