#!/usr/bin/env python3
"""Two models trained at once from two threads of one process on libtorch's CPU backend,
against one after the other: the OpenMP oversubscription behind "two models in one
libtorch process are slower". Same libtorch 2.9.0 and libgomp that Kiln's tch backend
links. Models, data and optimizer from scripts/torch_gpt_reference.py (gpt2 and llama).

    .venv/bin/python scripts/torch_two_models_one_process.py [THREADS_PER_MODEL] [STEPS]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/torch_two_models_one_process.py 2
"""
import os
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt_reference as R  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.set_num_threads(threads)
train, _, vocab = R.load_shakespeare(os.path.join(R.ROOT, "datasets", "shakespeare"))


def job(arch, out):
    config = R.Config(vocab_size=vocab)
    model = R.GPT(config) if arch == "gpt2" else R.Llama(config)
    optimizer = R.configure_optimizer(model, 1e-4, 0.1, (0.9, 0.99))
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = R.get_batch(train, 12, 64)
        loss = F.cross_entropy(model(x).view(-1, vocab), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out[arch] = (time.perf_counter() - t0) / steps * 1e3


sequential = {}
job("gpt2", sequential)
job("llama", sequential)
concurrent = {}
workers = [threading.Thread(target=job, args=(arch, concurrent)) for arch in ("gpt2", "llama")]
t0 = time.perf_counter()
for w in workers:
    w.start()
for w in workers:
    w.join()
wall = time.perf_counter() - t0
print(
    f"{threads} threads per model: one after the other {sequential['gpt2']:.1f} / {sequential['llama']:.1f} ms/step, "
    f"at once {concurrent['gpt2']:.1f} / {concurrent['llama']:.1f} ms/step; wall {wall:.1f} s at once vs "
    f"{(sequential['gpt2'] + sequential['llama']) * steps / 1e3:.1f} s one after the other"
)
