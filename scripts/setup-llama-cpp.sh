#!/usr/bin/env bash
# llama.cpp built from source, the peer of the LLM benchmarks (scripts/bench-llm.sh) and
# of the Gemma tokenizer fixture (scripts/make_llm_fixtures.py): the llama.cpp tree that
# PyPI's llama-cpp-python==0.3.36 sdist vendors (vendor/llama.cpp), configured offline for
# the CPU with Debian's cmake: llama-bench, llama-batched-bench, llama-cli, llama-completion, llama-perplexity, llama-tokenize,
# llama-server, and its convert_hf_to_gguf.py / gguf-py.
#   scripts/setup-llama-cpp.sh      -> $KILN_CACHE/llama.cpp/build/bin/
# Not used by CI. Needs cmake, g++ (apt-get install cmake g++) and pip; the sdist is
# downloaded without building the Python package (scikit-build-core keeps pip from
# bootstrapping cmake from source).
set -euo pipefail
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
src="$cache/llama.cpp"
bin="$src/build/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-batched-bench" ] && [ -x "$bin/llama-completion" ] && [ -x "$bin/llama-perplexity" ] && [ -x "$bin/llama-tokenize" ]; then
  echo "llama.cpp is built in $bin"; exit 0
fi
command -v cmake > /dev/null || { echo "cmake is missing: apt-get install -y cmake" >&2; exit 1; }
py="${KILN_VENV:-$cache/venv}/bin/python"
[ -x "$py" ] || py=python3
mkdir -p "$cache/pip/sdist"
sdist="$cache/pip/sdist/llama_cpp_python-0.3.36.tar.gz"
if [ ! -f "$sdist" ]; then
  "$py" -m pip install --quiet --disable-pip-version-check scikit-build-core
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    --no-build-isolation llama-cpp-python==0.3.36 -d "$cache/pip/sdist"
fi
if [ ! -f "$src/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  tar -xzf "$sdist" -C "$tmp"
  rm -rf "$src"
  mv "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp "$src"
  rm -rf "$tmp"
fi
# Native code for this CPU, but no AMX: on a VM that lists AMX in /proc/cpuinfo without
# granting the tile state (seen on a Sapphire Rapids VM, 2026-12-02), -march=native's AMX
# kernels (ggml's repacked Q8_0/Q4_0 buffers) die with SIGILL / a general protection
# fault in llama-bench and llama-perplexity. Harmless where the CPU has no AMX.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" > "$src/build.log"
cmake --build "$src/build" --config Release -j "$(nproc)" \
  --target llama-bench llama-batched-bench llama-cli llama-completion llama-perplexity llama-tokenize llama-server llama-quantize >> "$src/build.log"
echo "built llama.cpp ($(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo vendored in llama-cpp-python 0.3.36)) in $bin"
