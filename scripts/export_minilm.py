#!/usr/bin/env python3
"""Re-save the real all-MiniLM-L6-v2 (datasets/pretrained/all-MiniLM-L6-v2, from
scripts/fetch-minilm.sh) in the two other formats `convert` reads, with torch:

- pytorch_model.bin: `torch.save` of the BertModel state dict (a zip pickle);
- model.onnx: `torch.onnx.export` of BertModel (TorchScript exporter, opset 17, no
  constant folding so initializers keep their parameter names), inputs input_ids and
  attention_mask, output last_hidden_state;

and compute onnxruntime's mean-pooled, L2-normalised embeddings of the test sentences
(tests/fixtures/minilm_embeddings.json) into model.onnx.reference.json. Everything is
written next to the model (git-ignored). CI runs this through scripts/fetch-minilm.sh --torch.

    python scripts/export_minilm.py datasets/pretrained/all-MiniLM-L6-v2
"""
import json
import os
import sys

import numpy as np
import onnxruntime
import torch
from tokenizers import Tokenizer
from transformers import BertModel


def main(model_dir):
    torch.manual_seed(0)
    model = BertModel.from_pretrained(model_dir).eval()
    torch.save(model.state_dict(), os.path.join(model_dir, "pytorch_model.bin"))
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    mask = torch.ones_like(ids)
    onnx_path = os.path.join(model_dir, "model.onnx")
    torch.onnx.export(
        model, (ids, mask), onnx_path, input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
        opset_version=17, do_constant_folding=False, dynamo=False,
    )
    root = os.path.join(os.path.dirname(__file__), "..")
    sentences = json.load(open(os.path.join(root, "tests/fixtures/minilm_embeddings.json")))["sentences"]
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    hidden = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    m = mask[:, :, None].astype(np.float32)
    mean = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    emb = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    json.dump({"onnxruntime": onnxruntime.__version__, "sentences": sentences, "embeddings": emb.tolist()},
              open(onnx_path + ".reference.json", "w"))
    print(f"wrote pytorch_model.bin, model.onnx and onnxruntime reference embeddings to {model_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
