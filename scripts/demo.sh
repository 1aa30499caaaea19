#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: plan the seed scenario
# (GPT-13B -> GPT-1.3B on 32 A100-80GB) and print the plan summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/kdplan plan examples/seed/job.toml -o out/seed-plan.json
