#!/usr/bin/env python3
"""ONNX files as third-party exporters write them, with onnxruntime's outputs on each, for
`convert`'s graph resolution (tests/convert_onnx.rs):

    python scripts/export_onnx_variants.py minilm MINILM_DIR   # into MINILM_DIR/onnx-variants/
    python scripts/export_onnx_variants.py tiny OUT_DIR         # tests/fixtures/onnx (committed)

Every export uses `torch.onnx.export` at its defaults (TorchScript exporter, constant
folding on, so the weight matrices become initializers renamed `onnx::MatMul_NNN`, stored
pre-transposed `[in, out]`) of a sentence-transformers-shaped wrapper (parameter names
`model.0.auto_model.encoder...`), whose outputs are the last hidden state and the mean-
pooled, L2-normalised sentence embedding. The variants:

- default.onnx: opset 17 (LayerNormalization nodes), inputs input_ids + attention_mask;
- opset14.onnx: opset 14, where LayerNorm is decomposed (ReduceMean, Sub, Pow, Sqrt, Div);
- external.onnx + external.onnx.data: default.onnx with every initializer in a side file;
- fp16.onnx: float16 initializers (the model exported in half precision when onnxruntime
  runs it on CPU, else FP16 initializers each followed by a Cast to float);
- int8.onnx: onnxruntime's dynamic int8 quantization of default.onnx (MatMulInteger,
  DynamicQuantizeLinear, per-tensor scales and zero points);
- MiniLM only: pytorch_model.f16.bin and pytorch_model.bf16.bin (half-precision state
  dicts, for `convert`'s dtype handling); optimum/model.onnx, Optimum's exporter (optimum-onnx) with its
  config.json beside;
- tiny only: dynamo.onnx (torch's dynamo exporter), token-types.onnx (a third input token_type_ids) and the malformed graphs
  cycle.onnx, missing-initializer.onnx, wrong-arity.onnx.

Each NAME.onnx gets NAME.onnx.reference.json: onnxruntime's last_hidden_state and
sentence_embedding on the test sentences (MiniLM; tests/fixtures/minilm_embeddings.json)
or on fixed random ids (tiny BERT). CI runs the MiniLM part through
scripts/fetch-minilm.sh --torch; the tiny part's output is committed.
"""
import copy
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class Transformer(nn.Module):
    """sentence_transformers.models.Transformer's attribute layout (`auto_model`)."""

    def __init__(self, bert):
        super().__init__()
        self.auto_model = bert


class SentenceModel(nn.Module):
    """A SentenceTransformer's layout: modules under `model.0`, mean pooling, Normalize."""

    def __init__(self, bert, token_types=False):
        super().__init__()
        self.model = nn.ModuleList([Transformer(bert)])
        self.token_types = token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.model[0].auto_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return hidden, torch.nn.functional.normalize(mean, p=2, dim=1)


def export(module, path, opset, example, token_types=False):
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["sentence_embedding"] = {0: "batch"}
    torch.onnx.export(module, example, path, input_names=names,
                      output_names=["last_hidden_state", "sentence_embedding"],
                      dynamic_axes=axes, opset_version=opset, dynamo=False)


def reference(path, feeds, note):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    hidden, emb = session.run(["last_hidden_state", "sentence_embedding"], feeds)
    out = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "form": note,
           "input_ids": feeds["input_ids"].tolist(), "attention_mask": feeds["attention_mask"].tolist(),
           "last_hidden_state": hidden.astype(np.float32).tolist(),
           "sentence_embedding": emb.astype(np.float32).tolist()}
    json.dump(out, open(path + ".reference.json", "w"))


def variants(model, out_dir, feeds, tiny):
    os.makedirs(out_dir, exist_ok=True)
    ids = torch.tensor(feeds["input_ids"][:1])
    mask = torch.tensor(feeds["attention_mask"][:1])
    wrapped = SentenceModel(model).eval()
    p = lambda name: os.path.join(out_dir, name)
    export(wrapped, p("default.onnx"), 17, (ids, mask))
    reference(p("default.onnx"), feeds, "torch.onnx.export defaults, opset 17")
    export(wrapped, p("opset14.onnx"), 14, (ids, mask))
    reference(p("opset14.onnx"), feeds, "opset 14: decomposed LayerNorm")

    m = onnx.load(p("default.onnx"))
    for f in ["external.onnx", "external.onnx.data"]:
        if os.path.exists(p(f)):
            os.remove(p(f))
    onnx.save_model(m, p("external.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    reference(p("external.onnx"), feeds, "external data in external.onnx.data")

    export(SentenceModel(copy.deepcopy(model)).eval().half(), p("fp16.onnx"), 17, (ids, mask))
    try:
        reference(p("fp16.onnx"), feeds, "exported in half precision")
    except Exception as e:  # onnxruntime's CPU kernels lack some float16 op
        print(f"onnxruntime cannot run the half-precision export on CPU ({e}); FP16 initializers + Cast instead")
        m = onnx.load(p("default.onnx"))
        casts = []
        for init in m.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init).astype(np.float16)
                name = init.name
                init.CopyFrom(onnx.numpy_helper.from_array(arr, name + "_fp16"))
                casts.append(onnx.helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                                   name="Cast_" + name))
        nodes = casts + list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        onnx.save(m, p("fp16.onnx"))
        reference(p("fp16.onnx"), feeds, "FP16 initializers, each Cast to float")

    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(p("default.onnx"), p("int8.onnx"), weight_type=QuantType.QInt8)
    reference(p("int8.onnx"), feeds, "onnxruntime quantize_dynamic, QInt8 weights")

    if tiny:
        # torch's dynamo exporter (torch.export + onnxscript), the default of newer torch.
        # (Example inputs of batch 2: torch.export specializes a dimension of size 1.)
        two = (torch.tensor(feeds["input_ids"][:2]), torch.tensor(feeds["attention_mask"][:2]))
        torch.onnx.export(wrapped, two, p("dynamo.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_shapes=({0: "batch", 1: "sequence"}, {0: "batch", 1: "sequence"}), dynamo=True)
        reference(p("dynamo.onnx"), feeds, "torch.onnx.export(dynamo=True)")
        typed = SentenceModel(model, token_types=True).eval()
        types = torch.zeros_like(ids)
        export(typed, p("token-types.onnx"), 17, (ids, mask, types), token_types=True)
        reference(p("token-types.onnx"), dict(feeds, token_type_ids=np.zeros_like(feeds["input_ids"])),
                  "a third input token_type_ids (all zeros)")
        malformed(p)


def optimum(model_dir, out, feeds):
    """Optimum's exporter (`optimum-cli export onnx --task feature-extraction`): its own
    graph (inputs input_ids, attention_mask, token_type_ids; output last_hidden_state) and
    config.json beside it. The sentence embedding of the reference is onnxruntime's last
    hidden state mean-pooled and normalised in numpy, as sentence-transformers pools it."""
    from optimum.exporters.onnx import main_export
    main_export(model_dir, output=out, task="feature-extraction", library_name="transformers")
    path = os.path.join(out, "model.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    run = {k: v for k, v in dict(feeds, token_type_ids=np.zeros_like(feeds["input_ids"])).items() if k in names}
    hidden = session.run(["last_hidden_state"], run)[0]
    m = feeds["attention_mask"][:, :, None].astype(np.float32)
    mean = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    emb = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    import optimum.version
    json.dump({"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
               "form": f"Optimum {optimum.version.__version__} export, inputs {names}",
               "input_ids": feeds["input_ids"].tolist(), "attention_mask": feeds["attention_mask"].tolist(),
               "last_hidden_state": hidden.tolist(), "sentence_embedding": emb.tolist()},
              open(path + ".reference.json", "w"))


def malformed(p):
    base = onnx.load(p("default.onnx"))
    # A cycle: the first LayerNormalization reads the output of the last node.
    m = onnx.ModelProto(); m.CopyFrom(base)
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    ln.input[0] = m.graph.node[-1].output[0]
    onnx.save(m, p("cycle.onnx"))
    # A node reads an initializer the file does not hold.
    m = onnx.ModelProto(); m.CopyFrom(base)
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1].startswith("onnx::MatMul"))
    gone = mm.input[1]
    keep = [i for i in m.graph.initializer if i.name != gone]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.save(m, p("missing-initializer.onnx"))
    # A MatMul with one input.
    m = onnx.ModelProto(); m.CopyFrom(base)
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    del mm.input[1:]
    onnx.save(m, p("wrong-arity.onnx"))
    json.dump({"cycle.onnx": ln.name, "missing-initializer.onnx": [mm.name, gone]},
              open(p("malformed.json"), "w"))


def main(kind, out):
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel
    if kind == "minilm":
        from tokenizers import Tokenizer
        model = BertModel.from_pretrained(out, attn_implementation="eager").eval()
        sentences = json.load(open(os.path.join(ROOT, "tests/fixtures/minilm_embeddings.json")))["sentences"]
        tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
        tok.enable_padding()
        enc = tok.encode_batch(sentences)
        feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
        os.makedirs(os.path.join(out, "onnx-variants"), exist_ok=True)
        # Half-precision PyTorch checkpoints (`model.half()` / `.bfloat16()` state dicts).
        for name, dtype in [("pytorch_model.f16.bin", torch.float16), ("pytorch_model.bf16.bin", torch.bfloat16)]:
            half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
            torch.save(half, os.path.join(out, "onnx-variants", name))
        variants(model, os.path.join(out, "onnx-variants"), feeds, tiny=False)
        optimum(out, os.path.join(out, "onnx-variants", "optimum"), feeds)
    else:
        config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                            layer_norm_eps=1e-12, attn_implementation="eager")
        model = BertModel(config).eval()
        with torch.no_grad():  # a trained-looking model: non-trivial LayerNorm weights and biases
            for name, param in model.named_parameters():
                if "LayerNorm" in name or name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.1)
        rng = np.random.default_rng(0)
        ids = rng.integers(1, 99, size=(3, 9)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0
        mask[2, 4:] = 0
        variants(model, out, {"input_ids": ids, "attention_mask": mask}, tiny=True)
    print(f"wrote the ONNX variants and onnxruntime's outputs to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
