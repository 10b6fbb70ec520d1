#!/usr/bin/env python3
"""PyTorch eager reference for Kiln's Fashion-MNIST CNN (configs/fashion-mnist-cnn.toml):
the speed anchor the backend comparison (benches/compare_backends.rs) measures Kiln against.

Same data as Kiln: the IDX files in --data (gzipped or not), pixels scaled to
(x/255 - 0.5) / 0.5, batches drawn from a seeded shuffle of the training split. Same
model: two (conv 3x3 pad 1 -> ReLU -> max-pool 2) stages (channels --channels), flatten,
Linear to --hidden, ReLU, dropout, Linear to 10 classes. Same optimizer: AdamW
lr 1e-3, betas (0.9, 0.999), weight decay 0.01 on matrices and kernels only, global-norm
gradient clipping at 1.0.

    .venv/bin/python scripts/torch_cnn_reference.py [--data datasets/fashion-mnist] [--steps 50] [--threads 2] [--json]

Times the first training step on its own, runs --warmup-steps untimed steps, then
--steps timed ones, and prints mean/median ms per step, images/s, forward-only ms
(median, no_grad, one training batch) and peak RSS. Set up the interpreter with
scripts/setup-torch-cpu.sh.
"""
import argparse
import gzip
import json
import os
import statistics
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference_timing import optimizer_step, peak_rss_mib, time_calls, time_training

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def read_idx(path):
    """An IDX file of u8 (path or path.gz) -> a uint8 tensor of its shape."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).view(*dims)


def load_split(data_dir, images, labels):
    x = read_idx(os.path.join(data_dir, images)).float().div(255.0).sub(0.5).div(0.5)  # (N, 28, 28)
    return x.unsqueeze(1), read_idx(os.path.join(data_dir, labels)).long()  # (N, 1, 28, 28), (N,)


class Cnn(nn.Module):
    def __init__(self, channels, hidden, dropout, classes=10, size=28):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (size // 4) * (size // 4), hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C1, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, C2, 7, 7)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))  # (B, hidden)
        return self.fc2(x)  # (B, 10)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "datasets", "fashion-mnist"))
    p.add_argument("--channels", default="32,64")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = args.data if os.path.isabs(args.data) else os.path.join(ROOT, args.data)
    x_train, y_train = load_split(data, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    channels = [int(c) for c in args.channels.split(",")]
    model = Cnn(channels, args.hidden, args.dropout)
    model.train()
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    order = torch.randperm(len(x_train))

    def batch(step):
        start = (step * args.batch_size) % (len(order) - args.batch_size)
        idx = order[start : start + args.batch_size]
        return x_train[idx], y_train[idx]

    def train_step(step):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        return optimizer_step(model, optimizer, loss, args.grad_clip)

    first_step_s, times, loss = time_training(train_step, args.warmup_steps, args.steps)

    model.eval()
    with torch.no_grad():
        x, y = batch(0)
        forward = time_calls(lambda: F.cross_entropy(model(x), y).item(), args.steps)

    mean_s = statistics.mean(times)
    result = {
        "impl": "pytorch-eager",
        "arch": "cnn",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in params),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "ms_per_step_mean": 1000 * mean_s,
        "ms_per_step_median": 1000 * statistics.median(times),
        "first_step_ms": 1000 * first_step_s,
        "items_per_step": args.batch_size,
        "images_per_s": args.batch_size / mean_s,
        "forward_ms": 1000 * statistics.median(forward),
        "decode_tokens_per_s": None,
        "peak_rss_mib": peak_rss_mib(),
        "train_loss": loss,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
