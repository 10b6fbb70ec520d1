#!/usr/bin/env bash
# Task 1 of `finetune`, measured: all-MiniLM-L6-v2 on the Rotten Tomatoes split with
# method = full, frozen and lora in Kiln, and full and frozen in the PyTorch reference
# (scripts/finetune_reference.py, the same recipe read from the same config), one after
# the other on this machine; prints a Markdown table (test accuracy, macro-F1, time per
# epoch, ratio to PyTorch, peak RSS).
#   scripts/bench-finetune.sh [--backend flex|ndarray|tch] [--out runs/bench-finetune] [--set KEY=VALUE ...]
# Needs scripts/fetch-minilm.sh, scripts/fetch-sentiment.sh and scripts/setup-torch-cpu.sh
# (and for --backend tch, scripts/setup-libtorch.sh with LIBTORCH exported).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
backend=flex
out=runs/bench-finetune
config=configs/finetune-minilm-sentiment.toml
python="${KILN_VENV:-$root/.venv}/bin/python"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "usage: $0 [--backend B] [--out DIR] [--set KEY=VALUE ...]" >&2; exit 2 ;;
  esac
done
rm -rf "$out"
mkdir -p "$out"
features=()
case "$backend" in
  tch|tch-cuda) features=(--features tch) ;;
  wgpu) features=(--features wgpu) ;;
esac
cargo build --release --quiet -p finetune "${features[@]}"
bin="${CARGO_TARGET_DIR:-$root/target}/release/finetune"
kiln() {  # kiln <name> <--set ...>
  local name="$1"; shift
  /usr/bin/time -f "%M" -o "$out/$name.rss" "$bin" --config "$config" --backend "$backend" --out "$out/$name" \
    "$@" "${extra[@]}" 2> "$out/$name.log" | tee -a "$out/summary.txt"
}
kiln kiln-full --set method=full
kiln kiln-frozen --set method=frozen
kiln kiln-lora --set method=lora --set optim.lr=5e-4
for m in full frozen; do
  /usr/bin/time -f "%M" -o "$out/torch-$m.rss" "$python" scripts/finetune_reference.py --config "$config" \
    --method "$m" --json "$out/torch-$m.json" > "$out/torch-$m.log" 2>&1
  tail -1 "$out/torch-$m.log" | tee -a "$out/summary.txt"
done
"$python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def rss(name):
    return int(open(os.path.join(out, name + ".rss")).read().split()[-1]) / 1024
torch = {m: json.load(open(os.path.join(out, f"torch-{m}.json"))) for m in ("full", "frozen")}
print("| run | trained params | test acc | macro-F1 | ms/step | s/epoch | vs PyTorch (same method) | peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for m in ("full", "frozen", "lora"):
    r = json.load(open(os.path.join(out, f"kiln-{m}", "finetune.json")))
    t = torch.get(m) or torch["full"]
    ratio = r["epoch_time_s"] / t["epoch_time_s"]
    print(f"| Kiln {m} | {r['trainable_params']:,} | {r['test']['accuracy']*100:.2f}% | {r['test']['macro_f1']:.4f} "
          f"| {r['train']['train_ms_per_step']:.0f} | {r['epoch_time_s']:.0f} | {ratio:.2f}x ({'' if m in torch else 'vs full, '}PyTorch {t['epoch_time_s']:.0f} s) "
          f"| {rss('kiln-' + m):.0f} MiB |")
for m, t in torch.items():
    print(f"| PyTorch {t['torch']} {m} | | {t['test_accuracy']*100:.2f}% | {t['test_macro_f1']:.4f} | {t['ms_per_step']:.0f} "
          f"| {t['epoch_time_s']:.0f} | 1.00x | {rss('torch-' + m):.0f} MiB |")
PY
