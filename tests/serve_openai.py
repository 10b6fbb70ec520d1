"""The official `openai` package against `serve`, as any user's code would call it.

Run by tests/cli_serve.rs with two servers (SmolLM2-135M-Instruct and MiniLM):
    python tests/serve_openai.py LM_URL ENCODER_URL --api-key KEY
Exits non-zero (an assertion) on the first check that fails.
"""

import argparse
import asyncio
import math

import openai
from openai import AsyncOpenAI, OpenAI


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def completions(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    c = r.choices[0]
    check(r.object == "text_completion" and len(c.text) > 0, f"completion {r}")
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
    check(r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0, f"usage {r.usage}")
    again = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    check(again.choices[0].text == c.text, "greedy is deterministic")
    # n choices with a seed: reproducible, and the choices differ from one another.
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    check([x.text for x in a.choices] == [x.text for x in b.choices], "seeded sampling is reproducible")
    check(sorted(x.index for x in a.choices) == [0, 1, 2], "n=3 gives three choices")
    check(len({x.text for x in a.choices}) > 1, f"the choices differ: {[x.text for x in a.choices]}")
    # Stop strings end the text before them.
    s = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    check(" 7" not in s.choices[0].text and s.choices[0].finish_reason == "stop", f"stop: {s.choices[0]}")
    # Log-probabilities: the chosen token's and the top alternatives, each <= 0.
    lp = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lpc = lp.choices[0].logprobs
    check(len(lpc.tokens) == 4 and len(lpc.top_logprobs[0]) == 3, f"logprobs {lpc}")
    check(all(x <= 0 for x in lpc.token_logprobs), "log-probabilities are <= 0")
    # Greedy picks the most likely token.
    check(math.isclose(lpc.token_logprobs[0], max(lpc.top_logprobs[0].values()), abs_tol=1e-6), "greedy = top-1")
    print("completions: ok")


def chat(client):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    whole = r.choices[0].message.content
    check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", f"chat {r}")
    check("Paris" in whole, f"SmolLM2-Instruct knows: {whole!r}")
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, roles, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(pieces) == whole, f"streamed {''.join(pieces)!r} == whole {whole!r}")
    check(roles == ["assistant"] and finish in ("stop", "length"), f"roles {roles}, finish {finish}")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"usage {usage}")
    lp = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content
    check(len(content) >= 1 and len(content[0].top_logprobs) == 2, f"chat logprobs {content}")
    print("chat (whole, streamed, logprobs): ok")


def errors(url, client):
    try:
        client.completions.create(model="smollm2", prompt="x", max_tokens=4, temperature=7)
        raise AssertionError("temperature 7 accepted")
    except openai.BadRequestError as e:
        check(e.body["param"] == "temperature", f"names the field: {e.body}")
    try:
        OpenAI(base_url=url, api_key="wrong").models.list()
        raise AssertionError("a wrong key accepted")
    except openai.AuthenticationError:
        pass
    models = client.models.list()
    check([m.id for m in models.data] == ["smollm2"], f"models {models}")
    print("errors and models: ok")


async def concurrent_streams(url, key, clients=16):
    client = AsyncOpenAI(base_url=url, api_key=key)

    async def one(i):
        stream = await client.completions.create(
            model="smollm2", prompt=f"Story {i}:", max_tokens=6, temperature=0, stream=True
        )
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    texts = await asyncio.gather(*(one(i) for i in range(clients)))
    check(all(texts), f"every stream produced text: {texts}")
    await client.close()
    print(f"{clients} concurrent async streams: ok")


def embeddings(client):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    # The package asks for base64 unless told otherwise; both forms must agree.
    b64 = client.embeddings.create(model="all-MiniLM-L6-v2-kiln", input=texts)
    flt = client.embeddings.create(model="all-MiniLM-L6-v2-kiln", input=texts, encoding_format="float")
    check(len(b64.data) == 3 and len(b64.data[0].embedding) == 384, "3 embeddings of 384")
    for x, y in zip(b64.data, flt.data):
        check(max(abs(a - b) for a, b in zip(x.embedding, y.embedding)) < 1e-6, "base64 == float")
    e = [d.embedding for d in flt.data]
    norm = math.sqrt(sum(v * v for v in e[0]))
    check(abs(norm - 1) < 1e-4, f"normalised: {norm}")
    cos = lambda a, b: sum(p * q for p, q in zip(a, b))
    check(cos(e[0], e[1]) > cos(e[0], e[2]) + 0.2, "similar sentences are closer")
    one = client.embeddings.create(model="all-MiniLM-L6-v2-kiln", input="A cat sits on the mat.", encoding_format="float")
    check(max(abs(a - b) for a, b in zip(one.data[0].embedding, e[0])) < 1e-5, "a string input = its list entry")
    check(b64.usage.prompt_tokens > 10, f"usage {b64.usage}")
    print("embeddings: ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lm_url")
    ap.add_argument("encoder_url")
    ap.add_argument("--api-key", required=True)
    a = ap.parse_args()
    lm = OpenAI(base_url=a.lm_url, api_key=a.api_key, max_retries=0)
    print(f"openai {openai.__version__}")
    completions(lm)
    chat(lm)
    errors(a.lm_url, lm)
    asyncio.run(concurrent_streams(a.lm_url, a.api_key))
    embeddings(OpenAI(base_url=a.encoder_url, api_key=a.api_key, max_retries=0))
    print("all openai client checks passed")


if __name__ == "__main__":
    main()
