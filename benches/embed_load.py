"""Embeddings throughput: Kiln's `serve` /v1/embeddings under concurrent clients, and
sentence-transformers' `encode` in one process on the same texts (the Rotten Tomatoes
reviews), both with THREADS CPU threads.
    python benches/embed_load.py kiln URL --concurrency C --requests R [--batch B]
    python benches/embed_load.py st MODEL_DIR --requests R [--batch B] [--threads T]
One JSON line: requests/s, texts/s, latency p50/p99 (ms). A request is B texts.
"""

import argparse
import asyncio
import csv
import json
import time


def texts(n):
    rows = [r["text"].strip() for r in csv.DictReader(open("datasets/rotten-tomatoes/test.csv"))]
    return [rows[i % len(rows)] for i in range(n)]


def pct(values, p):
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def report(kind, a, lat, wall, failed=0):
    print(json.dumps({
        "server": kind,
        "concurrency": getattr(a, "concurrency", 1),
        "batch": a.batch,
        "requests": a.requests,
        "failed": failed,
        "requests_per_s": round(len(lat) / wall, 1),
        "texts_per_s": round(len(lat) * a.batch / wall, 1),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
    }))


async def kiln(a):
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    data = texts(a.requests * a.batch)
    lat, failed, sent = [], 0, 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=a.concurrency + 4)) as client:

        async def worker():
            nonlocal sent, failed
            while sent < a.requests:
                i = sent
                sent += 1
                body = {"input": data[i * a.batch:(i + 1) * a.batch], "encoding_format": "float"}
                t = time.perf_counter()
                r = await client.post(a.target + "/v1/embeddings", json=body)
                if r.status_code != 200 or len(r.json()["data"]) != a.batch:
                    failed += 1
                    continue
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        wall = time.perf_counter() - start
    report("kiln", a, lat, wall, failed)


def st(a):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    model = SentenceTransformer(a.target, device="cpu")
    data = texts(a.requests * a.batch)
    model.encode(data[: a.batch], batch_size=a.batch)  # warm-up
    lat = []
    start = time.perf_counter()
    for i in range(a.requests):
        t = time.perf_counter()
        model.encode(data[i * a.batch:(i + 1) * a.batch], batch_size=a.batch, normalize_embeddings=True)
        lat.append(time.perf_counter() - t)
    report("sentence-transformers", a, lat, time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["kiln", "st"])
    ap.add_argument("target")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.kind == "kiln":
        asyncio.run(kiln(a))
    else:
        st(a)


if __name__ == "__main__":
    main()
