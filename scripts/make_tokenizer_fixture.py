"""llama.cpp's token ids for the tokenizer corpus, the reference of Kiln's GGUF-built
Gemma 3 tokenizer (tests/pretrained.rs): transformers builds Gemma's GGUF tokenizer as a
Unigram model over its BPE scores, which is not the model's tokenizer, so llama.cpp's
`llama-tokenize` (scripts/setup-llama-cpp.sh) is the reference there.

  tests/fixtures/gguf/<name>-llama-cpp-tokens.bin.gz
      for each corpus file in order (tests/fixtures/tokenizer-varied.txt, then the
      committed Shakespeare texts, sorted): u32 LE count, then the ids (u32 LE) of the
      whole file, without the BOS llama-tokenize puts first.

  python3 scripts/make_tokenizer_fixture.py gemma3 [smollm2]
"""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache/kiln"))
tokenize = cache / "llama.cpp/build/bin/llama-tokenize"
MODELS = {
    "gemma3": root / "datasets/pretrained/gemma-3-270m/gemma-3-270m-q4_k_m.gguf",
    "smollm2": root / "datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def corpus_files():
    files = [root / "tests/fixtures/tokenizer-varied.txt"]
    files += sorted((root / "datasets/shakespeare-poems").glob("*.txt"))
    files += sorted((root / "datasets/shakespeare").glob("*.txt"))
    return files


for name in sys.argv[1:] or ["gemma3"]:
    out = bytearray()
    for f in corpus_files():
        r = subprocess.run([str(tokenize), "-m", str(MODELS[name]), "-f", str(f), "--ids", "--log-disable",
                            "--no-escape"], capture_output=True, text=True, check=True)
        ids = [int(x) for x in r.stdout.strip().splitlines()[-1].strip("[]").split(",") if x.strip()]
        bos = {"gemma3": 2}.get(name)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        out += struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}I", *ids)
        print(f"{name}: {f.name}: {len(ids)} ids", file=sys.stderr)
    path = root / f"tests/fixtures/gguf/{name}-llama-cpp-tokens.bin.gz"
    path.write_bytes(gzip.compress(bytes(out), 9, mtime=0))
    print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)
