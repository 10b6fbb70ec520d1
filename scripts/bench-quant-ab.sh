#!/usr/bin/env bash
# Decode, Kiln against llama.cpp, interleaved: ROUNDS rounds (default 7), each running
# Kiln's `infer` then llama.cpp for every type in turn, then the medians and their ratio.
# On a VM whose speed drifts between runs minutes apart, a single pair of runs is not a
# ratio; interleaved runs see the same drift. BATCH=1 (default): 128 tokens after the
# 16-token prompt, against `llama-bench -n 128`; BATCH=8: the aggregate decode tokens/s
# of the 8 short prompts decoded together (`infer --prompt-file ... --max-batch 8`),
# against `llama-batched-bench -npp 16 -ntg 128 -npl 8` (speed_tg), as bench-quant.sh.
# Type f32 is the f32 directory and GGUF that bench-quant.sh starts from; type shipped
# the downloaded GGUF (llama.cpp) and its `convert --keep-quantized` directory (Kiln).
#   scripts/bench-quant-ab.sh smollm2|gemma3 TYPE...      e.g. scripts/bench-quant-ab.sh smollm2 q4_0 q8_0
#   BATCH=8 ROUNDS=5 scripts/bench-quant-ab.sh smollm2 f32 q4_0
# INFER=PATH runs another build of `infer` (an A/B of two commits: copy one binary aside).
# Reads the directories and GGUF files scripts/bench-quant.sh makes ($CARGO_TARGET_DIR/bench-llm).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$target/bench-llm"
llama="$cache/llama.cpp/build/bin"
export RAYON_NUM_THREADS="${THREADS:-2}"
model="$1"; shift
[ -f "$work/$model-short.txt" ] || { echo "run scripts/bench-quant.sh $model first" >&2; exit 1; }
runs="$(mktemp)"
trap 'rm -f "$runs"' EXIT
batch="${BATCH:-1}"
shipped() {
  case "$1" in
    smollm2) echo datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    gemma3) echo datasets/pretrained/gemma-3-270m/gemma-3-270m-q4_k_m.gguf ;;
  esac
}
infer="${INFER:-$target/release/infer}"
for r in $(seq "${ROUNDS:-7}"); do
  for f in "$@"; do
    dir="$work/$model-kiln-$f"
    gguf="$work/$model-$f.gguf"
    [ "$f" = f32 ] && dir="$work/$model-kiln"
    [ "$f" = shipped ] && gguf="$(shipped "$model")"
    if [ "$batch" = 8 ]; then
      k=$("$infer" --checkpoint "$dir" --prompt-file "$work/$model-short8.txt" --max-batch 8 \
        --max-new-tokens 128 --temperature 0 --ignore-eos 2>&1 > /dev/null | grep -o 'decode [0-9.]* tokens/s' | grep -o '[0-9.]*')
      l=$("$llama/llama-batched-bench" -m "$gguf" -t "$RAYON_NUM_THREADS" -c 2048 -npp 16 -ntg 128 -npl 8 \
        --output-format jsonl 2> /dev/null | grep '^{' | tail -1 | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['speed_tg'])")
    else
      k=$("$infer" --checkpoint "$dir" --prompt "$(cat "$work/$model-short.txt")" \
        --max-new-tokens 128 --temperature 0 --ignore-eos 2>&1 > /dev/null | grep -o "[0-9.]* tokens/s (KV cache)" | cut -d' ' -f1)
      l=$("$llama/llama-bench" -m "$gguf" -t "$RAYON_NUM_THREADS" -p 0 -n 128 -r 1 -o csv 2> /dev/null \
        | tail -1 | awk -F, '{print $(NF-1)}' | tr -d '"')
    fi
    echo "$f $k $l" >> "$runs"
    echo "round $r $f: Kiln $k, llama.cpp $l tokens/s" >&2
  done
done
python3 - "$model" "$runs" "$batch" <<'PY'
import collections, statistics as st, sys
model, path = sys.argv[1], sys.argv[2]
runs = collections.defaultdict(lambda: ([], []))
for line in open(path):
    f, k, l = line.split()
    runs[f][0].append(float(k)); runs[f][1].append(float(l))
print(f"| model, type, batch {sys.argv[3]} | Kiln runs (tokens/s) | llama.cpp runs | median ratio | median of the paired ratios |")
print("|---|---|---|---:|---:|")
for f, (k, l) in runs.items():
    print(f"| {model} {f.upper()} | {' '.join(f'{v:.1f}' for v in k)} | {' '.join(f'{v:.1f}' for v in l)} "
          f"| {st.median(k) / st.median(l):.2f}x | {st.median([a / b for a, b in zip(k, l)]):.2f}x |")
PY
