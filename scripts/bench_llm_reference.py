"""transformers (PyTorch eager, float32, CPU) rows of scripts/bench-llm.sh: the same GGUF
file, the same prompt ids, the same thread count as Kiln and llama.cpp.

  python scripts/bench_llm_reference.py --dir D --gguf F --prompt-ids ids.json --threads 2
prints one JSON line: load_s, cold_first_token_s (from interpreter start), prefill_tok_s
(512-token prompt), decode_b1_tok_s, decode_b8_tok_s (128 new tokens each), peak_rss_mib.
"""
import argparse
import json
import resource
import time

t_start = time.time()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--gguf", required=True)
p.add_argument("--prompt-ids", required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--new", type=int, default=128)
a = p.parse_args()
torch.set_num_threads(a.threads)
ids = json.load(open(a.prompt_ids))
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(a.dir, gguf_file=a.gguf, dtype=torch.float32).eval()
load_s = time.time() - t0


def decode(batch, new):
    x = torch.tensor([ids[:16]] * batch)
    t = time.time()
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                       min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    return time.time() - t


with torch.no_grad():
    x = torch.tensor([ids])
    t = time.time()
    model(x)
    cold_first = time.time() - t_start
    # prefill: best of 3
    pre = min((lambda: (lambda t: (model(x), time.time() - t)[1])(time.time()))() for _ in range(3))
# decode: time for `new` tokens minus the time for 1 (the prefill of the 16-token prompt)
one = decode(1, 1)
b1 = (a.new - 1) / (decode(1, a.new) - one)
one8 = decode(8, 1)
b8 = 8 * (a.new - 1) / (decode(8, a.new) - one8)
print(json.dumps({"load_s": load_s, "cold_first_token_s": cold_first, "prefill_tok_s": len(ids) / pre,
                  "decode_b1_tok_s": b1, "decode_b8_tok_s": b8,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
