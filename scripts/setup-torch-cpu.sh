#!/usr/bin/env bash
# A project-local Python (.venv, git-ignored) with PyTorch 2.9.0 for the reference
# scripts in scripts/ (speed and loss anchors). Not needed to build or test Kiln.
# PyPI's Linux torch wheel depends on the CUDA runtime packages, so this is a large
# (~4-5 GB) one-off install; downloads are cached under $KILN_CACHE.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KILN_CACHE:-$HOME/.cache/kiln}/pip"
[ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
"$root/.venv/bin/pip" install -q --cache-dir "$cache" torch==2.9.0 numpy
"$root/.venv/bin/python" -c 'import torch; print("torch", torch.__version__, "ready in .venv")'
