#!/usr/bin/env bash
# Install the project's Python dependencies into the current Python environment.
# Idempotent, and quick (no pip run at all) when every pinned version is already installed.
# torch goes first and alone: installed as a dependency of something else, pip may pick a
# multi-GB CUDA build where a CPU wheel is available locally.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"

# Exit status 0 when every "name==version" line of the given files is installed at that version.
pins_satisfied() {
    "$PYTHON" - "$@" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if not m:
            sys.exit(1)  # not a plain pin: let pip decide
        try:
            installed = version(m.group(1)).split("+", 1)[0]  # 2.13.0+cpu satisfies 2.13.0
        except PackageNotFoundError:
            sys.exit(1)
        if installed != m.group(2):
            sys.exit(1)
PY
}

if pins_satisfied requirements.txt requirements-nodeps.txt; then
    echo "install.sh: all pinned requirements already installed"
    exit 0
fi

TORCH_PIN="$(grep -E '^torch==' requirements.txt)"
"$PYTHON" -m pip install -q --no-input "$TORCH_PIN"
"$PYTHON" -m pip install -q --no-input -r requirements.txt
"$PYTHON" -m pip install -q --no-input --no-deps -r requirements-nodeps.txt
echo "install.sh: done"
