#!/usr/bin/env bash
# SmolLM2-135M-Instruct exported to ONNX by Optimum, with the KV cache, as model hubs
# ship it, and onnxruntime's logits on it (scripts/export_onnx_decoders.py --smollm2), for
# tests/pretrained.rs: made once per version of the script (about 1 min, 3.5 GB of
# memory), cached in $KILN_CACHE/llm-onnx, and copied into
# datasets/pretrained/smollm2-135m-instruct/onnx/. Needs the GGUF (scripts/fetch-llms.sh)
# and the Python environment of scripts/llm-reference.sh (transformers, gguf, optimum).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
[ -x "$py" ] || { echo "no Python environment at $py: run scripts/setup-torch-cpu.sh" >&2; exit 1; }
"$py" -c 'import optimum.exporters.onnx, onnxruntime, gguf' 2>/dev/null || {
  echo "optimum, onnxruntime or gguf missing in $py: run scripts/fetch-minilm.sh --torch and scripts/llm-reference.sh" >&2
  exit 1
}
key=$(cat scripts/export_onnx_decoders.py datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
  | sha256sum | cut -c1-16)
cached="$cache/llm-onnx/smollm2-$key"
out="datasets/pretrained/smollm2-135m-instruct/onnx"
if [ ! -f "$cached/model.onnx.reference.json" ]; then
  start=$(date +%s)
  rm -rf "$cached.tmp"
  "$py" scripts/export_onnx_decoders.py --smollm2 "$cached.tmp" > "$cache/llm-onnx-smollm2.log" 2>&1 \
    || { tail -n 40 "$cache/llm-onnx-smollm2.log" >&2; exit 1; }
  rm -rf "$cached" && mv "$cached.tmp" "$cached"
  echo "SmolLM2's ONNX export made in $(( $(date +%s) - start )) s"
fi
if ! cmp -s "$cached/model.onnx.reference.json" "$out/model.onnx.reference.json" 2>/dev/null; then
  rm -rf "$out.tmp" && cp -r "$cached" "$out.tmp" && rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "SmolLM2's ONNX export is in $out"
