#!/usr/bin/env bash
# The demo: SplitLoRA, 3 clients, split layer 3, SmolLM2-135M-Instruct on E2E (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${SPLITLORA_VENV:-.venv}/bin/activate"
splitlora train --config configs/demo.yaml --output "${1:-runs/demo}"
