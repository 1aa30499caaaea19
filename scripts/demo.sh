#!/usr/bin/env bash
# The main job, on a fresh machine: set up (scripts/setup.sh), plan the seed scenario
# (GPT-13B -> GPT-1.3B on 32 A100-80GB in 4 DGX nodes) and print the plan; then plan and run the
# tiny CPU distillation (examples/tiny-cpu) on 2 gloo processes and print measured vs predicted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p out
echo "== kdplan plan examples/seed/job.toml"
.venv/bin/kdplan plan examples/seed/job.toml -o out/seed-plan.json
echo
echo "== kdplan plan examples/tiny-cpu/job.toml && kdplan run (2 CPU processes, gloo)"
.venv/bin/kdplan plan examples/tiny-cpu/job.toml -o out/tiny-plan.json --top 0
.venv/bin/kdplan run out/tiny-plan.json --steps 20 --report out/tiny-report.json
