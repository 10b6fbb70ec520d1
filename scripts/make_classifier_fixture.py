#!/usr/bin/env python3
"""A tiny randomly initialised Hugging Face `BertForSequenceClassification` (three named
labels) for `convert`'s task-head conversion (tests/convert.rs; run once with
transformers, the output is committed):

tests/fixtures/hf-tiny-bert-classifier/   config.json (id2label), model.safetensors,
                                          logits.json (logits on fixed ids and masks)

    .venv/bin/python scripts/make_classifier_fixture.py
"""
import json
import os

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf-tiny-bert-classifier")
IDS = [[2, 17, 33, 5, 61, 3, 0, 0], [2, 9, 44, 12, 7, 30, 21, 3], [2, 40, 3, 0, 0, 0, 0, 0]]
MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]]


def main():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, type_vocab_size=2,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2}, classifier_dropout=0.2)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        # Non-trivial norms, biases and head (HF initialises them to 1, 0 and small values).
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(5.0)
        model.classifier.weight.mul_(4.0)
        logits = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    model.save_pretrained(OUT, safe_serialization=True)
    json.dump({"input_ids": IDS, "attention_mask": MASK, "logits": logits.tolist(),
               "transformers": transformers.__version__}, open(os.path.join(OUT, "logits.json"), "w"))
    print("wrote", OUT, "logits", logits.tolist())


if __name__ == "__main__":
    main()
