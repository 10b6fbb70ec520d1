"""Reference fixtures for Kiln's quantizers (crates/kiln-kernels/tests/quantize.rs), made
with llama.cpp's own Python package (PyPI `gguf`, the version pinned in scripts/):

  tests/fixtures/quant/input.f32     64 blocks of 32 little-endian f32 values
  tests/fixtures/quant/<TYPE>.bin    gguf.quants.quantize(input, TYPE) for Q8_0, Q4_0, Q4_1

The input mixes random normal blocks of several magnitudes with blocks made to hit the
edge cases: all zeros, one nonzero value, all equal, the largest value negative, exact
rounding ties for Q8_0 (x / d = k + 1/2), subnormal-sized values, and large ones.

  $KILN_VENV/bin/python scripts/make_quant_fixtures.py     (gguf==0.19.0, numpy)
"""
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20261201)

blocks = []
for scale in [1e-6, 1e-3, 0.05, 1.0, 30.0, 1000.0]:
    for _ in range(8):
        blocks.append(rng.standard_normal(32) * scale)
blocks.append(np.zeros(32))
one = np.zeros(32); one[7] = -0.75; blocks.append(one)
blocks.append(np.full(32, 0.3))
neg = rng.standard_normal(32); neg[3] = -5.0; blocks.append(neg)
tie = np.arange(32) - 15.5; tie[0] = 127.0; blocks.append(tie)        # d = 1: x / d = k + 0.5
blocks.append(rng.standard_normal(32) * 1e-30)
blocks.append(rng.uniform(-1, 1, 32) * 60000.0)
while len(blocks) < 64:
    blocks.append(rng.uniform(-2, 3, 32))
x = np.concatenate(blocks).astype(np.float32)
assert x.size == 64 * 32
(out / "input.f32").write_bytes(x.tobytes())
for qtype in [T.Q8_0, T.Q4_0, T.Q4_1]:
    q = gguf.quants.quantize(x.reshape(2, -1), qtype)
    (out / f"{qtype.name}.bin").write_bytes(q.tobytes())
    print(qtype.name, q.nbytes, "bytes")
