"""Reference fixtures for Kiln's GGUF reader (crates/kiln-gguf/tests/reference.rs), made
with llama.cpp's own Python package (PyPI `gguf`, pinned below):

  tests/fixtures/gguf/quants.gguf  one 2 x 512 tensor of random blocks per tensor type
      Kiln reads (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K), each
      next to `<TYPE>.expected`: gguf.quants.dequantize's f32 output, which Kiln must
      reproduce bit for bit; plus one metadata key of every GGUF value type.

Random blocks: every byte random, except the f16 scales, which are random finite f16
values of mixed magnitudes (normals, subnormals, zero), so no block decodes to NaN.

  $KILN_VENV/bin/python scripts/make_gguf_fixtures.py     (gguf==0.19.0, numpy)
"""
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

assert gguf.__version__ if hasattr(gguf, "__version__") else True
out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20261201)
ROWS, COLS = 2, 512

# byte offsets of the f16 fields inside one block
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def random_f16(n):
    mags = rng.choice([1e-7, 1e-5, 1e-3, 0.1, 1.0, 100.0], size=n)
    v = (rng.standard_normal(n) * mags).astype(np.float16)
    v[rng.random(n) < 0.02] = 0
    return v


w = gguf.GGUFWriter(str(out / "quants.gguf"), "kiln-fixture")
for qtype in [T.F32, T.F16, T.BF16, *F16_FIELDS]:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block
    if qtype == T.F32:
        raw = (rng.standard_normal(ROWS * COLS) * 3).astype(np.float32).view(np.uint8)
    elif qtype == T.F16:
        raw = random_f16(ROWS * COLS).view(np.uint8)
    elif qtype == T.BF16:
        bits = (rng.standard_normal(ROWS * COLS).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = bits.view(np.uint8)
    else:
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for at in F16_FIELDS[qtype]:
            raw[:, at:at + 2] = random_f16(n_blocks).view(np.uint8).reshape(n_blocks, 2)
    raw = np.ascontiguousarray(raw).reshape(ROWS, -1)
    expected = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)
    assert np.isfinite(expected).all(), qtype.name
    w.add_tensor(qtype.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.add_tensor(f"{qtype.name}.expected", expected)

# one key of every value type
w.add_uint8("kiln.u8", 200)
w.add_int8("kiln.i8", -100)
w.add_uint16("kiln.u16", 60000)
w.add_int16("kiln.i16", -30000)
w.add_uint32("kiln.u32", 4_000_000_000)
w.add_int32("kiln.i32", -2_000_000_000)
w.add_uint64("kiln.u64", 18_000_000_000_000_000_000)
w.add_int64("kiln.i64", -9_000_000_000_000_000_000)
w.add_float32("kiln.f32", 0.25)
w.add_float64("kiln.f64", -1e300)
w.add_bool("kiln.bool", True)
w.add_string("kiln.string", "Grüße, 世界 🌍")
w.add_array("kiln.strings", ["a", "", "ü"])
w.add_array("kiln.ints", [1, -2, 3])
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {out / 'quants.gguf'} ({(out / 'quants.gguf').stat().st_size} bytes) with gguf {getattr(gguf, '__version__', '?')}", file=sys.stderr)
