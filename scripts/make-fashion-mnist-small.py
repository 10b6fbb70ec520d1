#!/usr/bin/env python3
"""Cut the committed test slice datasets/fashion-mnist-small/ from the full
Fashion-MNIST IDX files: the first 2000 training and 500 test images, same IDX
format, gzipped with mtime=0 so the output is byte-reproducible.

    python3 scripts/make-fashion-mnist-small.py SRC_DIR DST_DIR
"""
import gzip
import struct
import sys
from collections import Counter
from pathlib import Path

SPLITS = [("train", 2000), ("t10k", 500)]


def read_idx(path):
    data = gzip.open(path, "rb").read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype == 0x08, f"{path}: not an unsigned-byte IDX file"
    dims = list(struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim]))
    return dims, data[4 + 4 * ndim :]


def write_idx(path, dims, payload):
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(">" + "I" * len(dims), *dims)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(header + payload)


def main(src, dst):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in SPLITS:
        dims, pixels = read_idx(src / f"{split}-images-idx3-ubyte.gz")
        ldims, labels = read_idx(src / f"{split}-labels-idx1-ubyte.gz")
        assert dims[0] == ldims[0] >= n
        size = dims[1] * dims[2]
        write_idx(dst / f"{split}-images-idx3-ubyte.gz", [n, dims[1], dims[2]], pixels[: n * size])
        write_idx(dst / f"{split}-labels-idx1-ubyte.gz", [n], labels[:n])
        counts = Counter(labels[:n])
        # Every class present and none above 3x its fair share: a usable test slice.
        assert len(counts) == 10 and max(counts.values()) <= 3 * n // 10, counts
        print(f"{split}: {n} images {dims[1]}x{dims[2]}, labels {dict(sorted(counts.items()))}")
    print(f"wrote the small slice to {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
