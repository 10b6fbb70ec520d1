#!/usr/bin/env bash
# Task 3 of `finetune`, measured: the main job's character GPT (eight plays) continued on
# Shakespeare's poems, against the base model and a from-scratch run with the same step
# budget, tokenizer and validation batches. Prints a Markdown table of validation loss
# on the poems (the last 10 % by position).
#   scripts/bench-finetune-lm.sh [--out runs/bench-finetune-lm]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out=runs/bench-finetune-lm
[ "${1:-}" = --out ] && out="$2"
rm -rf "$out"
mkdir -p "$out"
cargo build --release --quiet -p train -p finetune
bin="${CARGO_TARGET_DIR:-$root/target}/release"
steps=$(sed -n 's/^max_steps = //p' configs/finetune-shakespeare-poems.toml)
"$bin/train" --quiet --config configs/shakespeare-char.toml --out "$out/base"
"$bin/finetune" --quiet --config configs/finetune-shakespeare-poems.toml --out "$out/finetuned" \
  --set "init_from=\"$out/base\""
"$bin/train" --quiet --config configs/shakespeare-char.toml --out "$out/scratch" \
  --set data.path=datasets/shakespeare-poems --set "data.tokenizer=\"$out/base/tokenizer.json\"" \
  --set train.max_steps="$steps" --set train.eval_interval=100
python3 - "$out" "$steps" <<'PY'
import json, os, sys
out, steps = sys.argv[1], sys.argv[2]
ft = json.load(open(os.path.join(out, "finetuned", "finetune.json")))
scratch = json.load(open(os.path.join(out, "scratch", "summary.json")))
print("| model | steps on the poems | val loss on the poems (best) |")
print("|---|---:|---:|")
print(f"| base (eight plays, 2000 steps) | 0 | {ft['initial_val_loss']:.4f} |")
print(f"| base fine-tuned on the poems | {steps} | {ft['train']['best_val_loss']:.4f} |")
print(f"| from scratch on the poems | {steps} | {scratch['best_val_loss']:.4f} |")
PY
