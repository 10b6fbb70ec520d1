#!/usr/bin/env bash
# Batch-1 decode, Kiln against llama.cpp, interleaved: ROUNDS rounds (default 7), each
# running Kiln's `infer` then `llama-bench` for every type in turn, then the medians and
# their ratio. On a VM whose speed drifts between runs minutes apart, a single pair of
# runs is not a ratio; interleaved runs see the same drift.
#   scripts/bench-quant-ab.sh smollm2|gemma3 TYPE...      e.g. scripts/bench-quant-ab.sh smollm2 q4_0 q8_0
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
for r in $(seq "${ROUNDS:-7}"); do
  for f in "$@"; do
    k=$("$target/release/infer" --checkpoint "$work/$model-kiln-$f" --prompt "$(cat "$work/$model-short.txt")" \
      --max-new-tokens 128 --temperature 0 --ignore-eos 2>&1 > /dev/null | grep -o "[0-9.]* tokens/s (KV cache)" | cut -d' ' -f1)
    l=$("$llama/llama-bench" -m "$work/$model-$f.gguf" -t "$RAYON_NUM_THREADS" -p 0 -n 128 -r 1 -o csv 2> /dev/null \
      | tail -1 | awk -F, '{print $(NF-1)}' | tr -d '"')
    echo "$f $k $l" >> "$runs"
    echo "round $r $f: Kiln $k, llama.cpp $l tokens/s" >&2
  done
done
python3 - "$model" "$runs" <<'PY'
import collections, statistics as st, sys
model, path = sys.argv[1], sys.argv[2]
runs = collections.defaultdict(lambda: ([], []))
for line in open(path):
    f, k, l = line.split()
    runs[f][0].append(float(k)); runs[f][1].append(float(l))
print("| model, type | Kiln runs (tokens/s) | llama.cpp runs | median ratio | median of the paired ratios |")
print("|---|---|---|---:|---:|")
for f, (k, l) in runs.items():
    print(f"| {model} {f.upper()} | {' '.join(f'{v:.1f}' for v in k)} | {' '.join(f'{v:.1f}' for v in l)} "
          f"| {st.median(k) / st.median(l):.2f}x | {st.median([a / b for a, b in zip(k, l)]):.2f}x |")
PY
