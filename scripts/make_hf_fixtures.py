#!/usr/bin/env python3
"""Tiny randomly initialised Hugging Face models for Kiln's conversion parity tests
(run once with transformers; outputs are committed, no download involved):

tests/fixtures/hf-tiny-gpt2/       GPT2LMHeadModel: config.json, model.safetensors, pytorch_model.bin
tests/fixtures/hf-tiny-llama/      LlamaForCausalLM (GQA 4/2, untied head): the same files
tests/fixtures/hf_tiny_logits.json logits of both on a fixed token sequence

    .venv/bin/python scripts/make_hf_fixtures.py
"""
import json
import os

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
TOKENS = [[5, 17, 3, 88, 42, 0, 61, 7, 7, 95, 12, 30], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def save(model, name):
    out = os.path.join(fixtures, name)
    model.save_pretrained(out, safe_serialization=True)
    torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.tolist()


def main():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
        )
    ).eval()
    # Random, non-trivial norm weights and biases (HF initialises them to 1 and 0).
    with torch.no_grad():
        for name, p in list(gpt2.named_parameters()) + list(llama.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    logits = {"tokens": TOKENS, "transformers": transformers.__version__,
              "gpt2": save(gpt2, "hf-tiny-gpt2"), "llama": save(llama, "hf-tiny-llama")}
    json.dump(logits, open(os.path.join(fixtures, "hf_tiny_logits.json"), "w"))
    print("wrote tiny gpt2 and llama fixtures to", fixtures)


if __name__ == "__main__":
    main()
