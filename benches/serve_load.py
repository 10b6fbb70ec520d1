"""A load generator for OpenAI-compatible servers (Kiln's `serve`, llama.cpp's `llama-server`).

CONCURRENCY clients each send streaming `POST /v1/completions` requests (greedy,
`ignore_eos`, MAX_TOKENS tokens each, prompts cycled from PROMPTS, a line each) until
REQUESTS have been sent, reading the server-sent events as they come: time to first token
(the first chunk with text), the gaps between token chunks (inter-token latency), the
end-to-end time. Prints one JSON line:
    python benches/serve_load.py URL --concurrency C --requests R --max-tokens N --prompts FILE
Uses the `openai` package's HTTP client (httpx2 in openai 3, httpx before;
scripts/setup-openai-client.sh).
"""

import argparse
import asyncio
import json
import time

try:
    import httpx2 as httpx
except ImportError:
    import httpx


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one(client, url, model, prompt, max_tokens, stats):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first, last, chunks = None, None, 0
    itl = []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats["failed"] += 1
                stats["errors"].append(f"{r.status_code} {r.text[:200]}")
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if not text:
                    continue
                now = time.perf_counter()
                chunks += 1
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
            if not done or first is None:
                stats["failed"] += 1
                stats["errors"].append(f"stream ended without [DONE] or text ({chunks} chunks)")
                return
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        stats["failed"] += 1
        stats["errors"].append(repr(e)[:200])
        return
    end = time.perf_counter()
    stats["ttft"].append(first - start)
    stats["e2e"].append(end - start)
    stats["itl"].extend(itl)
    stats["chunks"] += chunks
    stats["ok"] += 1


async def run(a):
    prompts = [l.rstrip("\n") for l in open(a.prompts) if l.strip()]
    stats = {"ttft": [], "e2e": [], "itl": [], "chunks": 0, "ok": 0, "failed": 0, "errors": []}
    limits = httpx.Limits(max_connections=a.concurrency + 8, max_keepalive_connections=a.concurrency + 8)
    timeout = httpx.Timeout(600.0)
    sent = 0
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker():
            nonlocal sent
            while sent < a.requests:
                i = sent
                sent += 1
                await one(client, a.url, a.model, prompts[i % len(prompts)], a.max_tokens, stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        wall = time.perf_counter() - start
    ms = lambda v: round(v * 1000, 1)
    out = {
        "concurrency": a.concurrency,
        "requests": a.requests,
        "ok": stats["ok"],
        "failed": stats["failed"],
        "wall_s": round(wall, 2),
        # Every request generates max_tokens tokens (ignore_eos); chunks are what came.
        "tokens_per_s": round(stats["ok"] * a.max_tokens / wall, 1),
        "chunks_per_request": round(stats["chunks"] / max(stats["ok"], 1), 2),
        "requests_per_s": round(stats["ok"] / wall, 2),
        "ttft_p50_ms": ms(percentile(stats["ttft"], 50)),
        "ttft_p99_ms": ms(percentile(stats["ttft"], 99)),
        "itl_p50_ms": ms(percentile(stats["itl"], 50)),
        "itl_p99_ms": ms(percentile(stats["itl"], 99)),
        "e2e_p50_ms": ms(percentile(stats["e2e"], 50)),
        "e2e_p99_ms": ms(percentile(stats["e2e"], 99)),
        "errors": stats["errors"][:3],
    }
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--model", default="model")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
