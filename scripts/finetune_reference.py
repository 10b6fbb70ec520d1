#!/usr/bin/env python3
"""PyTorch reference for `finetune` task 1: fine-tune all-MiniLM-L6-v2 on the Rotten
Tomatoes split with the recipe of a Kiln fine-tuning config, read from the same TOML.

Same as Kiln, on purpose, so that the two runs compute the same function up to float
rounding and their test accuracies are comparable to a fraction of a point:
- data: the config's train/validation/test CSV files, rows with `drop_labels` and empty
  texts skipped, labels = the sorted labels of the training file;
- tokens: the model's tokenizer.json with its own padding/truncation off, [CLS] ... [SEP],
  cut to max_length keeping the final [SEP], each batch padded to its longest text;
- model: the Hugging Face BertModel of the checkpoint with dropout 0 (Kiln's BERT has
  none), masked mean pooling, dropout [head].dropout, a Linear head initialised to zero;
- order: Kiln's EpochSampler (SplitMix64 Fisher-Yates per epoch, re-implemented below);
- optimizer: AdamW (betas, eps, weight decay on matrices only), the [[optim.groups]] peak
  rates, linear warmup then cosine to min_lr (Kiln's OptimConfig::lr_at), global-norm
  clipping at train.grad_clip; evaluation on validation every eval_interval steps; the
  best-validation-loss weights scored on the test split.
method = "frozen" trains the head only; "lora" is not reproduced here (the anchor is
the full fine-tune).

    .venv/bin/python scripts/finetune_reference.py --config configs/finetune-minilm-sentiment.toml \
        [--method full|frozen] [--threads 2] [--max-steps N] [--json out.json]

Prints test accuracy, macro-F1, training ms/step (evaluation excluded) and the time of
one epoch at that rate.
"""
import argparse
import csv
import json
import math
import os
import re
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MASK64 = (1 << 64) - 1


class SplitMix64:
    """kiln_data::SplitMix64, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK64

    @classmethod
    def derive(cls, seed, stream):
        rng = cls(seed ^ ((stream * 0xD1B54A32D192ED03) & MASK64))
        rng.next_u64()
        return rng

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n):
        return ((self.next_u64() >> 32) * n) >> 32

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


class EpochSampler:
    """kiln_data::EpochSampler: step s takes positions s*B .. (s+1)*B of a stream of epochs."""

    def __init__(self, seed, n):
        self.seed, self.n, self.epoch, self.order = seed, n, None, list(range(n))

    def indices(self, step, batch):
        out = []
        for position in range(step * batch, (step + 1) * batch):
            epoch = position // self.n
            if self.epoch != epoch:
                self.order = list(range(self.n))
                SplitMix64.derive(self.seed, epoch).shuffle(self.order)
                self.epoch = epoch
            out.append(self.order[position % self.n])
        return out


def lr_at(o, step, max_steps):
    """kiln_train::config::OptimConfig::lr_at."""
    lr = o["lr"]
    min_lr = o.get("min_lr", lr / 10)
    warmup = o.get("warmup_steps", 0)
    decay = o.get("decay_steps", max_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    progress = (step - warmup) / max(decay - warmup, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def read_split(path, d, labels=None):
    drop = set(d.get("drop_labels", []))
    texts, names = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = row[d.get("label_column", "label")].strip()
            text = row[d.get("text_column", "text")].strip()
            if label in drop or not text:
                continue
            texts.append(text)
            names.append(label)
    if labels is None:
        labels = sorted(set(names))
    return texts, [labels.index(n) for n in names], labels


class Classifier(nn.Module):
    def __init__(self, bert, n_classes, dropout):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, n_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, ids, mask):
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.classifier(self.dropout(pooled))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/finetune-minilm-sentiment.toml"))
    ap.add_argument("--method", choices=["full", "frozen"], default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    os.chdir(ROOT)
    method = args.method or cfg.get("method", "full")
    t, o, d = cfg["train"], cfg.get("optim", {}), cfg["data"]
    max_steps = args.max_steps or t["max_steps"]
    max_len = cfg.get("max_length", 128)
    init = cfg["init_from"]
    hf_dir = init[: -len("-kiln")] if init.endswith("-kiln") else init

    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()

    def encode(texts):
        out = []
        for e in tok.encode_batch(texts):
            ids = e.ids
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [ids[-1]]
            out.append(ids)
        return out

    tr_texts, tr_y, labels = read_split(d["train"], d)
    va_texts, va_y, _ = read_split(d["validation"], d, labels)
    te_texts, te_y, _ = read_split(d["test"], d, labels)
    tr_ids, va_ids, te_ids = encode(tr_texts), encode(va_texts), encode(te_texts)

    def batch(ids, ys, idx):
        t_len = max(len(ids[i]) for i in idx)
        x = torch.zeros(len(idx), t_len, dtype=torch.long)
        m = torch.zeros(len(idx), t_len, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
        return x, m, torch.tensor([ys[i] for i in idx])

    bert_cfg = BertConfig.from_pretrained(hf_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertModel.from_pretrained(hf_dir, config=bert_cfg, attn_implementation="eager")
    model = Classifier(bert, len(labels), cfg.get("head", {}).get("dropout", 0.1))
    if method == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")

    groups = [(re.compile(g["pattern"]), g["lr"]) for g in o.get("groups", [])]
    base_lr = o.get("lr", 1e-3)
    param_groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        peak = base_lr
        for pattern, lr in groups:
            if pattern.search(name):
                peak = lr
        wd = o.get("weight_decay", 0.1) if p.dim() >= 2 else 0.0
        param_groups.append({"params": [p], "weight_decay": wd, "scale": peak / base_lr})
    opt = torch.optim.AdamW(
        param_groups, lr=base_lr, betas=(o.get("beta1", 0.9), o.get("beta2", 0.99)), eps=o.get("eps", 1e-8)
    )
    clip = t.get("grad_clip", 1.0)
    bsz = t["batch_size"]
    sampler = EpochSampler(t.get("seed", 1337), len(tr_ids))

    def evaluate(ids, ys):
        model.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        loss, preds = 0.0, [0] * len(ids)
        with torch.no_grad():
            for s in range(0, len(order), 64):
                idx = order[s : s + 64]
                x, m, y = batch(ids, ys, idx)
                logits = model(x, m)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                for i, p in zip(idx, logits.argmax(1).tolist()):
                    preds[i] = p
        model.train()
        return loss / len(ids), preds

    best = (float("inf"), None)
    step_times = []
    model.train()
    for step in range(max_steps):
        start = time.perf_counter()
        lr = lr_at(o, step, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        x, m, y = batch(tr_ids, tr_y, sampler.indices(step, bsz))
        loss = F.cross_entropy(model(x, m), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        loss_value = loss.item()
        step_times.append(time.perf_counter() - start)
        if (step + 1) % t["eval_interval"] == 0 or step + 1 == max_steps:
            val_loss, preds = evaluate(va_ids, va_y)
            acc = sum(p == y for p, y in zip(preds, va_y)) / len(va_y)
            print(f"step {step + 1} | train loss {loss_value:.4f} | val loss {val_loss:.4f} | val acc {acc * 100:.2f}%", flush=True)
            if val_loss < best[0]:
                best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, step + 1)
    model.load_state_dict(best[1])
    _, preds = evaluate(te_ids, te_y)
    acc = sum(p == y for p, y in zip(preds, te_y)) / len(te_y)
    f1s = []
    for c in range(len(labels)):
        tp = sum(p == c and y == c for p, y in zip(preds, te_y))
        fp = sum(p == c and y != c for p, y in zip(preds, te_y))
        fn = sum(p != c and y == c for p, y in zip(preds, te_y))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    timed = step_times[2:] or step_times  # the first steps warm up allocators
    ms = 1000 * sum(timed) / len(timed)
    steps_per_epoch = math.ceil(len(tr_ids) / bsz)
    result = {
        "method": method,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": max_steps,
        "best_step": best[2],
        "best_val_loss": best[0],
        "test_n": len(te_y),
        "test_accuracy": acc,
        "test_macro_f1": sum(f1s) / len(f1s),
        "test_f1": f1s,
        "ms_per_step": ms,
        "steps_per_epoch": steps_per_epoch,
        "epoch_time_s": ms * steps_per_epoch / 1000,
        "labels": labels,
    }
    print(
        f"PyTorch {torch.__version__} ({result['threads']} threads) {method}: test acc {acc * 100:.2f}% "
        f"macro-F1 {result['test_macro_f1']:.4f} (n = {len(te_y)}) | {ms:.1f} ms/step | "
        f"{result['epoch_time_s']:.1f} s/epoch"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
