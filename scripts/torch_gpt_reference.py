#!/usr/bin/env python3
"""PyTorch eager reference for Kiln's language-model recipes: the speed (and loss)
anchor that Kiln's numbers are compared against.

Same data as Kiln (every datasets/shakespeare/*.txt in sorted order, character
vocabulary of the whole corpus, first 90 % of characters for training), same model
(GPT-2 block: pre-LayerNorm, fused-qkv causal self-attention, tanh-GELU MLP, learned
positions, tied embeddings; or the Llama twin: RMSNorm, rotary "rotate half"
embeddings, SwiGLU, grouped-query attention, no biases, untied head), same optimizer
(AdamW, decay on matrices only, warmup + cosine to lr/10, global-norm clip 1.0).

    .venv/bin/python scripts/torch_gpt_reference.py [--arch gpt2|llama] [--steps 200] [--threads 2] [--json]

Prints mean/median ms per training step (after untimed warm-up steps), tokens/s and
the losses. Set up the interpreter with scripts/setup-torch-cpu.sh.
"""
import argparse
import glob
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_corpus(root):
    files = sorted(glob.glob(os.path.join(root, "*.txt")))
    text = "".join(open(f, encoding="utf-8").read() for f in files)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    split = int(len(text) * 0.9)
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    return ids[:split], ids[split:], len(chars)


# ---------------------------------------------------------------- GPT-2 ----
class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.n_head = c.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head: (B, T, V)


# ---------------------------------------------------------------- Llama ----
class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c.n_embd // c.n_head
        self.q_proj = nn.Linear(c.n_embd, c.n_head * d, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * d, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * d, bias=False)
        self.o_proj = nn.Linear(c.n_head * d, c.n_embd, bias=False)
        self.n_head, self.n_kv_head, self.d = c.n_head, c.n_kv_head, d

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class LlamaLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd)
        self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        d = c.n_embd // c.n_head
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(c.block_size).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "datasets", "shakespeare"))
    p.add_argument("--steps", type=int, default=200, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=352)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-iters", type=int, default=2000, help="length of the LR schedule")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train, val, vocab = load_corpus(a.data)
    a.vocab_size = vocab
    model = (GPT if a.arch == "gpt2" else Llama)(a)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.99), eps=1e-8,
    )

    def lr_at(step, warmup=100, min_lr=a.lr / 10):
        if step < warmup:
            return a.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, a.max_iters - warmup)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (a.lr - min_lr)

    def batch(ids):
        ix = torch.randint(len(ids) - a.block_size, (a.batch_size,))
        x = torch.stack([ids[i : i + a.block_size] for i in ix])
        y = torch.stack([ids[i + 1 : i + 1 + a.block_size] for i in ix])
        return x, y

    def train_step(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch(train)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for s in range(a.warmup_steps):
        train_step(s)
    times, loss = [], float("nan")
    for s in range(a.warmup_steps, a.warmup_steps + a.steps):
        t0 = time.perf_counter()
        loss = train_step(s)
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        val_loss = statistics.mean(
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in (batch(val) for _ in range(20))
        )
    mean_ms = 1000 * statistics.mean(times)
    result = {
        "impl": "pytorch-eager",
        "arch": a.arch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": a.steps,
        "ms_per_step_mean": mean_ms,
        "ms_per_step_median": 1000 * statistics.median(times),
        "tokens_per_s": a.batch_size * a.block_size / (mean_ms / 1000),
        "train_loss": loss,
        "val_loss": val_loss,
    }
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
