#!/usr/bin/env bash
# Kiln vs llama.cpp vs transformers on the pretrained LLMs of scripts/fetch-llms.sh, on
# the same weights in f32: Kiln converts the GGUF to f32 safetensors, llama.cpp runs the
# same GGUF re-quantised to F32 by its own llama-quantize (dequantised, like Kiln's), and
# transformers loads the GGUF in float32. The same 512-token prompt, 2 threads each.
#   [BACKENDS="flex tch"] scripts/bench-llm.sh [smollm2|gemma3]...   (default: flex; smollm2 gemma3)
# BACKENDS lists Kiln's backends, one column each (tch builds with
# `--features tch,wgpu`, the feature set CI also builds, and LIBTORCH from
# scripts/setup-libtorch.sh); the ratio columns use the
# fastest Kiln backend of each row.
# Needs: scripts/fetch-llms.sh, scripts/setup-llama-cpp.sh, the Python environment of
# scripts/setup-torch-cpu.sh with transformers and gguf; builds Kiln's release binaries.
# Prints one markdown table per model (docs/benchmarks.md keeps them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
llama="$cache/llama.cpp/build/bin"
threads="${THREADS:-2}"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/bench-llm"
mkdir -p "$work"
backends=(${BACKENDS:-flex})
features=()
for b in "${backends[@]}"; do
  case "$b" in
    flex|ndarray) ;;
    tch) features=(--features tch,wgpu); export LIBTORCH="${LIBTORCH:-$cache/libtorch}" ;;
    *) echo "unknown backend $b (flex, ndarray, tch)" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --workspace "${features[@]}" --bin convert --bin infer
export RAYON_NUM_THREADS="$threads"

declare -A DIR=([smollm2]=smollm2-135m-instruct [gemma3]=gemma-3-270m)
declare -A GGUF=([smollm2]=SmolLM2-135M-Instruct.Q4_1.gguf [gemma3]=gemma-3-270m-q4_k_m.gguf)
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 gemma3)
rss() { awk '/Maximum resident/ {printf "%.0f", $6 / 1024}' "$1"; }

for m in "${models[@]}"; do
  src="datasets/pretrained/${DIR[$m]}/${GGUF[$m]}"
  kiln="$work/$m-kiln"
  f32="$work/$m-f32.gguf"
  [ -f "$kiln/model.safetensors" ] || "$target/release/convert" --input "$src" --output "$kiln" > /dev/null
  [ -f "$f32" ] || "$llama/llama-quantize" --allow-requantize "$src" "$f32" F32 > "$work/$m-quantize.log" 2>&1
  "$py" scripts/llm_prompts.py "$kiln/tokenizer.json" "$work/$m"
  declare -A k_pre k_ttft k_cold k_b1 k_b8 k_rss
  for b in "${backends[@]}"; do
    echo "== $m: Kiln ($b)" >&2
    log="$work/$m-kiln-$b"
    /usr/bin/time -v "$target/release/infer" --checkpoint "$kiln" --backend "$b" --prompt "$(cat "$work/$m-prompt.txt")" \
      --max-new-tokens 1 --temperature 0 > /dev/null 2> "$log-prefill.log"
    /usr/bin/time -v "$target/release/infer" --checkpoint "$kiln" --backend "$b" --prompt "$(cat "$work/$m-short.txt")" \
      --max-new-tokens 128 --temperature 0 --ignore-eos > /dev/null 2> "$log-b1.log"
    "$target/release/infer" --checkpoint "$kiln" --backend "$b" --prompt-file "$work/$m-short8.txt" --max-batch 8 \
      --max-new-tokens 128 --temperature 0 --ignore-eos > /dev/null 2> "$log-b8.log"
    k_pre[$b]=$(grep -o '([0-9.]* prompt tokens/s)' "$log-prefill.log" | grep -o '[0-9.]*' | head -1)
    k_ttft[$b]=$(grep -o 'first token [0-9.]* ms' "$log-prefill.log" | grep -o '[0-9.]*')
    k_cold[$b]=$(grep -o 'cold start [0-9]* ms' "$log-prefill.log" | grep -o '[0-9]*')
    k_b1[$b]=$(grep -o '| [0-9.]* tokens/s (KV cache)' "$log-b1.log" | grep -o '[0-9.]*')
    k_b8[$b]=$(grep -o 'decode [0-9.]* tokens/s' "$log-b8.log" | grep -o '[0-9.]*')
    k_rss[$b]=$(rss "$log-b1.log")
  done
  # the fastest backend of a row (highest rate, lowest time)
  best() { local -n v=$1; printf '%s\n' "${v[@]}" | sort -g | { if [ "$2" = max ]; then tail -1; else head -1; fi; }; }
  cols() { local -n v=$1; local out=""; for b in "${backends[@]}"; do out+=" ${v[$b]} |"; done; echo "$out"; }

  echo "== $m: llama.cpp" >&2
  "$llama/llama-bench" -m "$f32" -t "$threads" -p 512 -n 128 -r 3 -o json > "$work/$m-llama-bench.json" 2> /dev/null
  l_pre=$("$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{[x for x in r if x['n_prompt']>0][0]['avg_ts']:.1f}\")" "$work/$m-llama-bench.json")
  l_b1=$("$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{[x for x in r if x['n_gen']>0][0]['avg_ts']:.1f}\")" "$work/$m-llama-bench.json")
  "$llama/llama-batched-bench" -m "$f32" -t "$threads" -c 2048 -npp 16 -ntg 128 -npl 8 --output-format jsonl \
    > "$work/$m-llama-batched.jsonl" 2> /dev/null || true
  l_b8=$("$py" -c "import json,sys; print(f\"{[json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')][-1]['speed_tg']:.1f}\")" "$work/$m-llama-batched.jsonl" 2>/dev/null || echo "n/a")
  # cold start and TTFT: process start to the first generated token of the 512-token prompt
  start=$(date +%s.%N)
  /usr/bin/time -v "$llama/llama-completion" -m "$f32" -t "$threads" -f "$work/$m-prompt.txt" -n 1 -no-cnv --temp 0 \
    -c 1024 > /dev/null 2> "$work/$m-llama-cli.log" < /dev/null || true
  l_cold=$("$py" -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) * 1e3:.0f}')" "$start" "$(date +%s.%N)")
  l_ttft=$("$py" -c "print(f'{512 / $l_pre * 1e3:.1f}')")
  l_rss=$(rss "$work/$m-llama-cli.log")

  echo "== $m: transformers" >&2
  "$py" scripts/bench_llm_reference.py --dir "datasets/pretrained/${DIR[$m]}" --gguf "${GGUF[$m]}" \
    --prompt-ids "$work/$m-ids.json" --threads "$threads" > "$work/$m-hf.json" 2> "$work/$m-hf.log"
  read -r h_pre h_b1 h_b8 h_cold h_rss < <("$py" -c "
import json,sys; r=json.load(open(sys.argv[1]))
print(f\"{r['prefill_tok_s']:.1f} {r['decode_b1_tok_s']:.1f} {r['decode_b8_tok_s']:.1f} {r['cold_first_token_s']*1e3:.0f} {r['peak_rss_mib']:.0f}\")" "$work/$m-hf.json")
  h_ttft=$("$py" -c "print(f'{512 / $h_pre * 1e3:.1f}')")

  ratio() { "$py" -c "print(f'{$1 / $2:.2f}x')" 2>/dev/null || echo "n/a"; }
  echo
  echo "### $m ($(basename "$src"), weights in f32; $threads threads; $(date -u +%Y-%m-%d))"
  echo
  head=""; rule="|---|"; for b in "${backends[@]}"; do head+=" Kiln $b |"; rule+="---:|"; done
  echo "| |$head llama.cpp (F32 GGUF) | transformers (eager f32) | best Kiln / llama.cpp | best Kiln / transformers |"
  echo "$rule---:|---:|---:|---:|"
  p=$(best k_pre max); d1=$(best k_b1 max); d8=$(best k_b8 max)
  echo "| prefill tokens/s (512-token prompt) |$(cols k_pre) $l_pre | $h_pre | $(ratio "$p" "$l_pre") | $(ratio "$p" "$h_pre") |"
  echo "| decode tokens/s, batch 1 |$(cols k_b1) $l_b1 | $h_b1 | $(ratio "$d1" "$l_b1") | $(ratio "$d1" "$h_b1") |"
  echo "| decode tokens/s, batch 8 (aggregate) |$(cols k_b8) $l_b8 | $h_b8 | $(ratio "$d8" "$l_b8") | $(ratio "$d8" "$h_b8") |"
  echo "| time to first token, 512-token prompt (ms) |$(cols k_ttft) $l_ttft | $h_ttft | | |"
  echo "| cold start: process start to first token (ms) |$(cols k_cold) $l_cold | $h_cold | | |"
  echo "| peak RSS (MiB) |$(cols k_rss) $l_rss | $h_rss | | |"
  unset k_pre k_ttft k_cold k_b1 k_b8 k_rss
done
