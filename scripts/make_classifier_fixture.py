#!/usr/bin/env python3
"""Tiny randomly initialised Hugging Face encoders for `convert`'s task-head and RoBERTa
conversion (tests/convert.rs; run once with transformers, the output is committed):

tests/fixtures/hf-tiny-bert-classifier/     BertForSequenceClassification, three named labels
tests/fixtures/hf-tiny-roberta-classifier/  RobertaForSequenceClassification (no pooler;
                                            classifier.dense + classifier.out_proj)
tests/fixtures/hf-tiny-roberta/             RobertaModel (positions after pad_token_id)

each with config.json, model.safetensors and reference.json: the logits (classifiers) or
the last hidden states and pooler output (RobertaModel) on fixed right-padded ids.

    .venv/bin/python scripts/make_classifier_fixture.py
"""
import json
import os

import torch
import transformers
from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
                          RobertaModel)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
IDS = [[2, 17, 33, 5, 61, 3, 0, 0], [2, 9, 44, 12, 7, 30, 21, 3], [2, 40, 3, 0, 0, 0, 0, 0]]
MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]]
LABELS = {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
          "label2id": {"negative": 0, "neutral": 1, "positive": 2}}
SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def randomize(model):
    """Non-trivial norms, biases and weights (HF initialises them to 1, 0 and std 0.02)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(5.0)


def save(model, name, ids, outputs):
    out = os.path.join(FIXTURES, name)
    model.save_pretrained(out, safe_serialization=True)
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)
    json.dump({"input_ids": ids, "attention_mask": MASK, **outputs, "transformers": transformers.__version__},
              open(os.path.join(out, "reference.json"), "w"))
    print("wrote", out)


def main():
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(**SIZES, max_position_embeddings=16, type_vocab_size=2,
                                                    classifier_dropout=0.2, **LABELS)).eval()
    randomize(bert)
    with torch.no_grad():
        bert.classifier.weight.mul_(4.0)
        logits = bert(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    save(bert, "hf-tiny-bert-classifier", IDS, {"logits": logits.tolist()})

    # RoBERTa: pad_token_id 1, so the real tokens' positions are 2, 3, ... and padding is id 1.
    ids = [[0 if i == 0 else (1 if m == 0 else t) for i, (t, m) in enumerate(zip(row, mrow))]
           for row, mrow in zip(IDS, MASK)]
    roberta_config = dict(**SIZES, max_position_embeddings=18, type_vocab_size=1, layer_norm_eps=1e-5,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2)
    classifier = RobertaForSequenceClassification(RobertaConfig(**roberta_config, **LABELS)).eval()
    randomize(classifier)
    with torch.no_grad():
        logits = classifier(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK)).logits
    save(classifier, "hf-tiny-roberta-classifier", ids, {"logits": logits.tolist()})

    encoder = RobertaModel(RobertaConfig(**roberta_config)).eval()
    randomize(encoder)
    with torch.no_grad():
        out = encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK))
    save(encoder, "hf-tiny-roberta", ids, {"last_hidden_state": out.last_hidden_state.tolist(),
                                           "pooler_output": out.pooler_output.tolist()})


if __name__ == "__main__":
    main()
