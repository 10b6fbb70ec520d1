#!/usr/bin/env python3
"""Decoder-only language models exported to ONNX as Optimum writes them, with
onnxruntime's logits on each, for `convert`'s graph resolution of GPT-2 and Llama
(tests/convert_onnx.rs). The inputs are the committed tiny random models
tests/fixtures/hf-tiny-gpt2 and hf-tiny-llama (scripts/make_hf_fixtures.py):

    python scripts/export_onnx_decoders.py tests/fixtures/onnx    # committed output
    python scripts/export_onnx_decoders.py --smollm2 OUT_DIR      # the real SmolLM2 (scripts/llm-onnx.sh)

For each ARCH in gpt2, llama, with Optimum's exporter (optimum-onnx, `main_export`, the
TorchScript exporter with constant folding, so Llama's projections become initializers
renamed `onnx::MatMul_NNN`, pre-transposed `[in, out]`, and GPT-2's tied head a
transposed copy of the token table):

- ARCH-optimum.onnx: task text-generation (inputs input_ids, attention_mask,
  position_ids; output logits);
- ARCH-with-past.onnx: task text-generation-with-past, the form model hubs ship
  (past_key_values.N.key/value inputs, present.N.* outputs).

and llama-scaled-rope.onnx: the tiny Llama with a llama3 `rope_scaling`, whose rotary
frequencies are not `theta^(-2i/d)` (refused without its config.json); and
gemma3-optimum/: a tiny random Gemma 3 (a sliding and a global layer, non-trivial norm
weights) made here, exported with its config.json kept beside (Gemma's sliding window,
rope bases and query scale are read from it, not off the graph); and roberta-optimum.onnx:
the committed tiny RobertaModel (tests/fixtures/hf-tiny-roberta, scripts/make_classifier_fixture.py)
exported for feature-extraction (positions counted from the padding index), with
onnxruntime's last_hidden_state on the fixture's ids in its reference.json.

With --smollm2: SmolLM2-135M-Instruct as transformers reads the shipped GGUF
(datasets/pretrained/smollm2-135m-instruct, dequantised to f32 by gguf-py), exported by
Optimum with the KV cache (OUT_DIR/model.onnx, 539 MB, and the config.json beside it),
with onnxruntime's logits on a tokenized sentence in OUT_DIR/model.onnx.reference.json.

The config.json Optimum writes beside the tiny files is not kept: `convert` reads the config
off the graph. Each NAME.onnx gets NAME.onnx.reference.json: onnxruntime's logits on the
token rows of tests/fixtures/hf_tiny_logits.json (an empty past for with-past).
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnxruntime
import torch
from optimum.exporters.onnx import main_export
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def reference(path, tokens, config):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.array(tokens, dtype=np.int64)
    b, t = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.tile(np.arange(t, dtype=np.int64), (b, 1))}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            heads = config.get("num_key_value_heads", config.get("n_head", config.get("num_attention_heads")))
            hidden = config.get("n_embd", config.get("hidden_size"))
            dim = config.get("head_dim") or hidden // config.get("n_head", config.get("num_attention_heads"))
            feeds[inp.name] = np.zeros((b, heads, 0, dim), dtype=np.float32)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0]
    json.dump({"tokens": tokens, "logits": logits.tolist(), "onnxruntime": onnxruntime.__version__,
               "note": "Optimum " + os.path.basename(path)},
              open(path + ".reference.json", "w"))
    return logits


def main(out):
    os.makedirs(out, exist_ok=True)
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    tokens = json.load(open(os.path.join(fixtures, "hf_tiny_logits.json")))["tokens"]
    for arch in ["gpt2", "llama"]:
        src = os.path.join(fixtures, f"hf-tiny-{arch}")
        config = json.load(open(os.path.join(src, "config.json")))
        for task, name in [("text-generation", "optimum"), ("text-generation-with-past", "with-past")]:
            with tempfile.TemporaryDirectory() as tmp:
                main_export(src, output=tmp, task=task, do_validation=False)
                path = os.path.join(out, f"{arch}-{name}.onnx")
                shutil.copy(os.path.join(tmp, "model.onnx"), path)
            logits = reference(path, tokens, config)
            print(f"{path}: logits {list(logits.shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "scaled")
        shutil.copytree(os.path.join(fixtures, "hf-tiny-llama"), model)
        config = json.load(open(os.path.join(model, "config.json")))
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        json.dump(config, open(os.path.join(model, "config.json"), "w"))
        main_export(model, output=os.path.join(tmp, "out"), task="text-generation", do_validation=False)
        shutil.copy(os.path.join(tmp, "out", "model.onnx"), os.path.join(out, "llama-scaled-rope.onnx"))
    gemma3(out, tokens)
    roberta(out)


def roberta(out):
    src = os.path.join(ROOT, "tests", "fixtures", "hf-tiny-roberta")
    ref = json.load(open(os.path.join(src, "reference.json")))
    path = os.path.join(out, "roberta-optimum.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        main_export(src, output=tmp, task="feature-extraction", do_validation=False)
        shutil.copy(os.path.join(tmp, "model.onnx"), path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array(ref["input_ids"], dtype=np.int64),
             "attention_mask": np.array(ref["attention_mask"], dtype=np.int64)}
    hidden = session.run(["last_hidden_state"], feeds)[0]
    json.dump({"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"],
               "last_hidden_state": hidden.tolist(), "onnxruntime": onnxruntime.__version__},
              open(path + ".reference.json", "w"))
    print(f"{path}: last_hidden_state {list(hidden.shape)}")


def gemma3(out, tokens):
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=8, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # the norms' weights: Gemma scales by (1 + w), HF initialises w = 0
                p.add_(torch.randn_like(p) * 0.1)
    export_model(model, os.path.join(out, "gemma3-optimum"), "text-generation", tokens)


def export_model(model, dest, task, tokens):
    """`model` saved and exported by Optimum for `task` into `dest` (model.onnx and its
    config.json), with onnxruntime's logits on `tokens`."""
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "hf"), safe_serialization=True)
        main_export(os.path.join(tmp, "hf"), output=os.path.join(tmp, "out"), task=task, do_validation=False)
        for name in ["model.onnx", "config.json"]:
            shutil.copy(os.path.join(tmp, "out", name), os.path.join(dest, name))
    logits = reference(os.path.join(dest, "model.onnx"), tokens, model.config.to_dict())
    print(f"{dest}: logits {list(logits.shape)}")


def smollm2(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.join(ROOT, "datasets", "pretrained", "smollm2-135m-instruct")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tokens = [tokenizer("The quick brown fox jumps over the lazy dog, and then").input_ids,
              tokenizer("Rust is a systems programming language that runs blazingly").input_ids]
    t = min(len(r) for r in tokens)
    tokens = [r[:t] for r in tokens]
    export_model(model, out, "text-generation-with-past", tokens)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--smollm2":
        smollm2(sys.argv[2])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
