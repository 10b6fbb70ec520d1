#!/usr/bin/env bash
# Every dataset the configs and tests use.
set -euo pipefail
here="$(dirname "$0")"
"$here/fetch-shakespeare.sh"
"$here/fetch-fashion-mnist.sh"
"$here/fetch-shakespeare.sh" --poems
"$here/fetch-sentiment.sh"
