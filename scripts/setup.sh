#!/usr/bin/env bash
# Create .venv (if missing) and install kdplan with the executor and test extras.
# The CPU build of torch is installed first from requirements-cpu.txt, so the package's
# normal torch range is already satisfied and no CUDA build is ever downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-cpu.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[executor,dev]"
