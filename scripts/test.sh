#!/usr/bin/env bash
# Install (if needed) and run the test suite: tiny random GPT-2 and Llama models, no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${SPLITLORA_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
