#!/usr/bin/env bash
# Nightly-style fuzzing: fresh random cases (not the reproducible CI corpus) for every fuzz suite.
#   scripts/fuzz_explore.sh [N] [pytest args...]    N examples per fuzz test (default 400)
# A failure prints hypothesis's reproduction blob (@reproduce_failure) and the failing case;
# add the case to the suite's hand-picked cases once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-400}"
shift || true
export OMP_NUM_THREADS=1 KDPLAN_FUZZ=explore KDPLAN_FUZZ_EXAMPLES="$N"
PY="${PYTHON:-.venv/bin/python}"  # PYTHON=... picks another interpreter
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_fuzz_inputs.py tests/test_fuzz_artifacts.py \
    tests/test_fuzz_flags.py "$@"
