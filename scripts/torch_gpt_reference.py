#!/usr/bin/env python3
"""PyTorch eager reference for Kiln's nanoGPT CPU recipe: the speed (and loss) anchor
that Kiln's Rust training loop is compared against.

Same data as Kiln: every datasets/shakespeare/*.txt, concatenated in sorted file-name
order, a character vocabulary over the whole text, the first 90 % (by position) for
training and the rest for validation. Same model as configs/shakespeare-char.toml:
GPT-2 blocks (pre-LayerNorm with biases, causal self-attention with a fused qkv
`c_attn`, GELU MLP 4x: GPT-2's tanh form, or with --activation gelu the exact one of
nanoGPT's nn.GELU(); learned positions `wpe`, `wte` tied to the LM head, dropout 0), or
with --arch llama the twin of configs/shakespeare-llama.toml (RMSNorm,
rotary "rotate half" positions, SwiGLU MLP, grouped-query attention, no biases,
untied head). Same optimizer: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on
matrices only, global-norm gradient clipping at 1.0, 100 warmup steps then cosine
decay to lr/10 at --max-iters.

    .venv/bin/python scripts/torch_gpt_reference.py [--arch gpt2|llama] [--steps 200] [--threads 2] [--json]

Times the first training step on its own, runs --warmup-steps untimed training steps,
then --steps timed ones (each: sample a random batch, forward, backward, clip, AdamW
step, read the loss), and prints mean and median ms per step, tokens/s (batch *
block_size / mean step time), the first step's time, forward-only ms (median, no_grad),
KV-cached greedy decode tokens/s (median of 3, checked against a full forward), peak
RSS, the last training loss and a validation loss over 20 random batches. Set up the interpreter with
scripts/setup-torch-cpu.sh.
"""
import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference_timing import optimizer_step, peak_rss_mib, time_calls, time_training

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@dataclass
class Config:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int = 2  # llama only: grouped-query attention
    llama_hidden: int = 352  # llama only: SwiGLU width, ~8/3 * n_embd rounded to a multiple of 32
    activation: str = "gelu_tanh"  # gpt2 only: "gelu_tanh" (GPT-2's gelu_new) or "gelu" (nanoGPT's nn.GELU())


# ---------------------------------------------------------------------------- data
def load_shakespeare(data_dir):
    """Token ids (train, val) and the vocabulary size of the char-level corpus."""
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".txt"))
    if not files:
        raise SystemExit(f"no *.txt files in {data_dir} (scripts/fetch-shakespeare.sh makes them)")
    text = "".join(open(os.path.join(data_dir, f), encoding="utf-8").read() for f in files)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], len(chars)


def get_batch(data, batch_size, block_size):
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i : i + block_size] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])  # (B, T), shifted by one
    return x, y


# --------------------------------------------------------------------------- GPT-2
class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x, past=None):
        """past: this layer's cached (k, v), each (B, nh, T_past, hs), or None. Returns the
        output and the (k, v) including the new positions."""
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k, v = append_past(past, k, v)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.c_proj(y), (k, v)


def append_past(past, k, v):
    """The KV cache: keys and values of earlier positions, then the new ones (on dim 2).
    Decoding feeds one token at a time after an uncached prompt, so a layer with a past
    attends to every cached position (no causal mask needed)."""
    if past is None:
        return k, v
    return torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        # GPT-2's "gelu_new" (tanh approximation) or the exact erf GELU
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)  # with bias, eps 1e-5
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, past=None):
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):
        return self.forward_cached(idx, None)[0]

    def forward_cached(self, idx, past):
        """idx (B, T) continuing the positions in `past` (a (k, v) per layer, or None) ->
        logits (B, T, vocab_size) and the extended past."""
        B, T = idx.size()
        p0 = 0 if past is None else past[0][0].size(2)
        assert p0 + T <= self.config.block_size
        pos = torch.arange(p0, p0 + T, dtype=torch.long)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        new_past = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None if past is None else past[i])
            new_past.append(kv)
        x = self.transformer.ln_f(x)
        return self.lm_head(x), new_past  # (B, T, vocab_size)


# --------------------------------------------------------------------------- Llama
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., C)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim, max_positions, theta=10000.0):
    """cos, sin: (max_positions, hs); the angle of position p and pair i repeated twice."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hs/2,)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):  # x: (B, nh, T, hs); cos, sin: (T, hs)
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # "rotate half"


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, past=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = append_past(past, k, v)  # (B, nkv, T_past + T, hs), cached after rotation
        rep = self.n_head // self.n_kv_head  # each kv head serves `rep` query heads
        k_all = k.repeat_interleave(rep, dim=1)  # (B, nh, T_past + T, hs)
        v_all = v.repeat_interleave(rep, dim=1)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=past is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.o_proj(y), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.llama_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.llama_hidden, bias=False)
        self.down_proj = nn.Linear(config.llama_hidden, config.n_embd, bias=False)

    def forward(self, x):  # (B, T, C) -> 2 x (B, T, F) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs)
        self.register_buffer("sin", sin, persistent=False)
        for module in self.modules():  # HF's init: N(0, 0.02) weights, unit norms
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        return self.forward_cached(idx, None)[0]

    def forward_cached(self, idx, past):
        B, T = idx.size()
        p0 = 0 if past is None else past[0][0].size(2)
        assert p0 + T <= self.config.block_size
        cos, sin = self.cos[p0 : p0 + T], self.sin[p0 : p0 + T]  # (T, hs)
        x = self.embed_tokens(idx)  # (B, T, C)
        new_past = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, None if past is None else past[i])
            new_past.append(kv)
        return self.lm_head(self.norm(x)), new_past  # (B, T, vocab_size)


# ------------------------------------------------------------------- generation
@torch.no_grad()
def greedy_decode_rate(model, prompt, block_size):
    """Greedy KV-cached generation from `prompt` (1-D ids) until the context is full, as
    Kiln's `generate` does it: new tokens after the first, per second of decoding."""
    new_tokens = block_size - len(prompt)
    t0 = time.perf_counter()
    logits, past = model.forward_cached(prompt.view(1, -1), None)
    first_at = None
    for i in range(new_tokens):
        nxt = int(logits[0, -1].argmax())  # read back to the host, like Kiln's sampler
        if i == 0:
            first_at = time.perf_counter()
        if i + 1 == new_tokens:
            break
        logits, past = model.forward_cached(torch.tensor([[nxt]]), past)
    return (new_tokens - 1) / (time.perf_counter() - first_at)


# ------------------------------------------------------------------------ training
def configure_optimizer(model, lr, weight_decay, betas):
    """AdamW with weight decay on matrices (and embeddings) only, as nanoGPT groups it."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases, norm weights
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def get_lr(step, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup, then cosine decay to min_lr at max_iters, then flat (Kiln's lr_at)."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= max_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--data", default=os.path.join(ROOT, "datasets", "shakespeare"), help="folder of *.txt files")
    p.add_argument("--steps", type=int, default=200, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed training steps before the timed ones")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2, help="llama: key/value heads")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--llama-hidden", type=int, default=352, help="llama: SwiGLU hidden width")
    p.add_argument("--activation", choices=["gelu_tanh", "gelu"], default="gelu_tanh", help="gpt2: the MLP's GELU")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--lr-warmup", type=int, default=100, help="learning-rate warmup steps")
    p.add_argument("--max-iters", type=int, default=2000, help="end of the cosine decay (the recipe's run length)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_data, val_data, vocab_size = load_shakespeare(args.data)
    config = Config(
        vocab_size=vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        n_kv_head=args.n_kv_head,
        llama_hidden=args.llama_hidden,
        activation=args.activation,
    )
    model = GPT(config) if args.arch == "gpt2" else Llama(config)
    model.train()
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, (0.9, 0.99))

    def train_step(step):
        lr = get_lr(step, args.lr, min_lr, args.lr_warmup, args.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.batch_size, args.block_size)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        return optimizer_step(model, optimizer, loss, args.grad_clip)

    # Step 0 timed on its own (first-step latency), then warm-up, then the timed steps.
    first_step_s, times, loss = time_training(train_step, args.warmup_steps, args.steps)

    model.eval()
    with torch.no_grad():
        # Forward only: the loss of one training batch, inference mode.
        x, y = get_batch(train_data, args.batch_size, args.block_size)

        def forward_loss():
            logits = model(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()

        forward = time_calls(forward_loss, args.steps)

        # Decode from a quarter-context validation prompt; the cache must agree with a
        # full forward pass over the same tokens.
        prompt = val_data[: args.block_size // 4]
        full = model(val_data[: args.block_size].view(1, -1))
        cached, past = model.forward_cached(val_data[: len(prompt)].view(1, -1), None)
        for i in range(len(prompt), args.block_size):
            step_logits, past = model.forward_cached(val_data[i : i + 1].view(1, -1), past)
            cached = torch.cat((cached, step_logits), dim=1)
        assert torch.allclose(full, cached, atol=1e-4), "KV-cached logits differ from the full forward"
        greedy_decode_rate(model, prompt, args.block_size)  # untimed
        decode = statistics.median(greedy_decode_rate(model, prompt, args.block_size) for _ in range(3))

        val_losses = []
        for _ in range(args.eval_iters):
            x, y = get_batch(val_data, args.batch_size, args.block_size)
            logits = model(x)
            val_losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())

    mean_s = statistics.mean(times) if times else float("nan")
    result = {
        "impl": "pytorch-eager",
        "arch": args.arch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),  # the tied wte/lm_head once
        "vocab_size": vocab_size,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "ms_per_step_mean": 1000 * mean_s,
        "ms_per_step_median": 1000 * statistics.median(times) if times else float("nan"),
        "first_step_ms": 1000 * first_step_s,
        "items_per_step": args.batch_size * args.block_size,
        "tokens_per_s": args.batch_size * args.block_size / mean_s,
        "forward_ms": 1000 * statistics.median(forward),
        "decode_tokens_per_s": decode,
        "peak_rss_mib": peak_rss_mib(),
        "train_loss": loss,
        "val_loss": statistics.mean(val_losses),
    }
    if args.arch == "llama":
        result.update(n_kv_head=args.n_kv_head, llama_hidden=args.llama_hidden)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
