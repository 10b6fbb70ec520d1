#!/usr/bin/env bash
# The official `openai` Python package (PyPI) in the test environment ($KILN_VENV, made
# by scripts/setup-torch-cpu.sh; default $KILN_CACHE/venv): tests/cli_serve.rs drives
# `serve` with it as any user's code would (tests/serve_openai.py), and
# scripts/bench-serve.sh's load generator (benches/serve_load.py) streams with its HTTP client.
#   scripts/setup-openai-client.sh
set -euo pipefail
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
venv="${KILN_VENV:-$cache/venv}"
version=3.51.0
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2> /dev/null; then
  echo "openai $version is in $venv"
  exit 0
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$cache/pip" "openai==$version"
echo "installed openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)') into $venv"
