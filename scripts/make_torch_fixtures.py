#!/usr/bin/env python3
"""PyTorch fixtures for Kiln's conversion tests (run once; outputs are committed):

- tests/fixtures/mlp_torch.pt: `torch.save` of a small MLP's state_dict (784 -> 16 -> 10,
  nn.Linear layout [out, in]) with its logits on 4 Fashion-MNIST test images in
  tests/fixtures/mlp_torch.json (inputs normalised as Kiln does: x / 127.5 - 1).
- tests/fixtures/evil.pt: a checkpoint whose pickle carries a __reduce__ payload
  (os.system("touch /tmp/kiln-pickle-payload-ran")); loading it must run nothing.

    .venv/bin/python scripts/make_torch_fixtures.py
"""
import gzip
import json
import os

import torch
import torch.nn as nn

root = os.path.join(os.path.dirname(__file__), "..")
fixtures = os.path.join(root, "tests", "fixtures")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.ModuleList([nn.Linear(784, 16)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, 10)
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kiln-pickle-payload-ran",))


def main():
    torch.manual_seed(0)
    model = Mlp().eval()
    torch.save(model.state_dict(), os.path.join(fixtures, "mlp_torch.pt"))
    raw = gzip.open(os.path.join(root, "datasets/fashion-mnist-small/t10k-images-idx3-ubyte.gz")).read()[16:]
    images = torch.tensor(list(raw[: 4 * 784]), dtype=torch.float32).view(4, 1, 28, 28) / 127.5 - 1.0
    with torch.no_grad():
        logits = model(images)
    json.dump(
        {"images": "datasets/fashion-mnist-small t10k[0..4]", "torch": torch.__version__, "logits": logits.tolist()},
        open(os.path.join(fixtures, "mlp_torch.json"), "w"),
    )
    torch.save({"weight": torch.zeros(2, 2), "payload": Payload()}, os.path.join(fixtures, "evil.pt"))
    print("wrote mlp_torch.pt, mlp_torch.json, evil.pt to", fixtures)


if __name__ == "__main__":
    main()
