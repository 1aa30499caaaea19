#!/usr/bin/env bash
# gpu_check.sh - the project's device check: kdplan's real code on one CUDA GPU (written for one
# NVIDIA H200, 16 cores, no network; at most ~7 minutes). From the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh     # results in $OUT (default /tmp/kdplan-gpu-check-out)
#
# One line per step, also in $OUT/summary.txt; a failing step never stops the next one:
#   [0] install: the wheels in ./.whl (the machine has no network) into $GPU_CHECK_SITE (/tmp/site)
#       with pip --target, which goes on PYTHONPATH for EVERY child (kdplan spawns torchrun, which
#       spawns the workers: they all need pydantic); then versions, device and imports.
#   [a] `kdplan profile --quick --device cuda --nproc 1 --base dgx-h200`: compute and memory
#       measured on the GPU, links kept from dgx-h200 (one GPU measures no collective; said in the
#       profile's provenance) -> $OUT/profile-h200.yaml (+ raw times, profile-raw.json).
#   [b] examples/tiny-cpu planned for one H200 (cluster dgx-h200, gpus 1, bf16) and run on cuda for
#       20 steps: measured vs predicted -> $OUT/tiny-plan.json, $OUT/tiny-report.json.
#   [c] forward+backward of one block at GPT-1.3B, GPT-13B and Llama-3-8B shapes (seq 2048, micro-
#       batches $LAYER_BATCHES), CUDA events, next to kdplan.cost.compute.layer_time with the shipped
#       h200 profile and [a]'s -> $OUT/layer-times.json.
#   [d] numerics on the GPU vs the CPU (KD loss and its host syncs, top-k codec and its transient
#       memory, teacher fake-quant, teacher checkpoint load in bf16, the 8-bit gradient hook on a
#       1-rank NCCL group) -> $OUT/numerics.json; and the CPU numerics tests under this torch
#       (started in the background at [c]).
# $OUT then holds at most 8 files: summary.txt, logs.txt (the tail of every log), profile-h200.yaml,
# profile-raw.json, tiny-plan.json, tiny-report.json, layer-times.json, numerics.json.
#
# Preparing the wheels (on a machine with network; the device has Python 3.12 and a CUDA torch):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic pydantic-core annotated-types typing-inspection pulp highspy
#
# Knobs: OUT, PYTHON (python3), GPU_CHECK_WHEELS (./.whl), GPU_CHECK_SITE (/tmp/site), LAYER_BATCHES ("1 8"), BUDGET_S (400:
# the steps' time limits shrink so that the whole check ends within it), GPU_CHECK_CPU_SMOKE=1 ([c]
# and [d] at toy sizes on the CPU, nothing installed, [a] [b] skipped: checks this script, not a
# GPU; tests/test_gpu_check.py runs it so).

set -u -o pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
if [ ! -f kdplan/cli/main.py ] || [ ! -f executor/launch.py ]; then
  echo "[0] FAIL: $REPO is not the kdplan repository"; exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/kdplan-gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
BUDGET_S=${BUDGET_S:-400}
LAYER_BATCHES=${LAYER_BATCHES:-1 8}
WORK=$(mktemp -d /tmp/kdplan-gpucheck.XXXXXX)
LOG=$WORK/logs
mkdir -p "$LOG"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
T0=$(date +%s)
SMOKEFLAG=()
if [ "$SMOKE" = 1 ]; then
  SMOKEFLAG=(--cpu-smoke)
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  # the checkout first (kdplan, executor), then the carried wheels; exported once, never reset
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1 KDPLAN_NO_PROGRESS=1
FAILED=0
PYTEST_PID=""

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - T0)); }
# a step's time limit: its own cap, or less so that the later steps keep their reserve
limit() {
  local cap=$1 reserve=$2 left
  left=$((BUDGET_S - $(elapsed) - reserve))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 20 ] && cap=20
  echo "$cap"
}
# the last informative line of a log (the error torch or kdplan printed), one line, <= 300 chars
lasterr() {
  local l
  l=$(grep -aE "Error|error:|Exception|refused|FAIL|invalid|No backend|Expected all tensors" "$1" 2>/dev/null |
    grep -avE "^\s*(File|raise|\^)" | tail -n 1)
  [ -z "$l" ] && l=$(grep -av "^\s*$" "$1" 2>/dev/null | tail -n 1)
  echo "${l:-<empty log $(basename "$1")>}" | tr -s ' ' | cut -c1-300
}
result() { grep -a "^RESULT " "$1" 2>/dev/null | tail -n 1 | sed 's/^RESULT //'; }
# rc -> "OK" | "FAIL (...)"; a word only (it runs in $(...)): `count` records the failure
status() {
  if [ "$1" = 0 ]; then echo OK
  elif [ "$1" = 124 ] || [ "$1" = 137 ]; then echo "FAIL (time limit)"
  else echo "FAIL (rc $1)"; fi
}
count() { [ "$1" = 0 ] || FAILED=$((FAILED + 1)); }
# timeout signals the whole process group it starts (torchrun and its workers included)
run_limited() { local t=$1; shift; timeout -k 10 "$t" "$@"; }

# ---------------------------------------------------------------------------------------------
HAVE_CUDA=0
step0() {
  local msg rc info gpu=""
  if [ "$SMOKE" = 1 ]; then
    msg="CPU smoke mode: nothing installed"
  elif compgen -G "$WHEELS/*.whl" >/dev/null; then
    if run_limited 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl >"$LOG/0-install.log" 2>&1; then
      msg="installed $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from $WHEELS into $SITE (on PYTHONPATH)"
    else
      msg="pip install of $WHEELS FAILED: $(lasterr "$LOG/0-install.log")"
    fi
  else
    msg="no wheels in $WHEELS: nothing installed (see the header for how to prepare them)"
  fi
  if [ "$SMOKE" != 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpu="; nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -s ' ')"
  fi
  run_limited 60 "$PY" benchmarks/gpu_check.py "${SMOKEFLAG[@]}" info >"$LOG/0-info.log" 2>&1
  rc=$?
  info=$(result "$LOG/0-info.log")
  [ -z "$info" ] && info="python/torch check failed: $(lasterr "$LOG/0-info.log")"
  "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 && HAVE_CUDA=1
  count $rc
  say "[0] $(status $rc) ($(elapsed) s): $info; $msg$gpu"
}

# ---------------------------------------------------------------------------------------------
stepA() {
  if [ "$HAVE_CUDA" != 1 ]; then say "[a] SKIP: no CUDA device (see [0])"; return; fi
  local rc t ngpu refusal=""
  # more processes than GPUs must be refused with one line (exit 2), before anything starts
  ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  run_limited 20 "$PY" -m kdplan.cli.main profile --quick --device cuda --nproc $((ngpu + 1)) -o "$WORK/refused.yaml" \
    >"$LOG/a-refusal.log" 2>&1
  rc=$?
  if [ $rc = 2 ] && ! grep -q Traceback "$LOG/a-refusal.log"; then
    refusal=" (--nproc $((ngpu + 1)) on $ngpu GPU(s): refused, rc 2: $(tr -s ' \n' ' ' <"$LOG/a-refusal.log" | cut -c1-200))"
  else
    count 1
    refusal=" (--nproc $((ngpu + 1)) on $ngpu GPU(s): NOT refused as expected, rc $rc: $(lasterr "$LOG/a-refusal.log"))"
  fi
  t=$(limit 150 200)
  rm -f "$OUT/profile-h200.yaml" "$OUT/profile-raw.json"
  run_limited "$t" "$PY" -m kdplan.cli.main profile --quick --device cuda --nproc 1 --base dgx-h200 \
    --name local-h200-1gpu -o "$OUT/profile-h200.yaml" --raw "$OUT/profile-raw.json" >"$LOG/a-profile.log" 2>&1
  rc=$?
  if [ $rc = 0 ] && [ -f "$OUT/profile-h200.yaml" ]; then
    run_limited 60 "$PY" benchmarks/gpu_check.py profile-line "$OUT/profile-h200.yaml" >"$LOG/a-profile-line.log" 2>&1
    rc=$?
    count $rc
    say "[a] $(status $rc) ($(elapsed) s): kdplan profile --quick --nproc 1 wrote profile-h200.yaml$refusal; $(result "$LOG/a-profile-line.log")$([ $rc = 0 ] || echo " (does not load: $(lasterr "$LOG/a-profile-line.log"))")"
  else
    [ $rc = 0 ] && rc=1  # rc 0 but no file
    count $rc
    say "[a] $(status $rc) ($(elapsed) s, limit $t s): kdplan profile --quick --device cuda --nproc 1 --base dgx-h200: $(lasterr "$LOG/a-profile.log")$refusal"
  fi
}

# ---------------------------------------------------------------------------------------------
stepB() {
  if [ "$HAVE_CUDA" != 1 ]; then say "[b] SKIP: no CUDA device (see [0])"; return; fi
  local d=$WORK/tiny ex=$REPO/examples/tiny-cpu rc t layout
  mkdir -p "$d"
  # the tiny example on one H200: same models, teacher checkpoint and tokenizer (absolute paths:
  # a job's [run] paths are relative to the job file), 1 GPU, bf16
  cat >"$d/job.toml" <<EOF
teacher = "$ex/teacher/config.json"
student = "$ex/student/config.json"
cluster = "dgx-h200"
gpus = 1
seq_len = 128
global_batch = 16
precision = "bf16"

[kd]
loss = "forward_kl"
temperature = 2.0
alpha = 0.5

[run]
steps = 20
lr = 3e-3
seed = 0
teacher_checkpoint = "$ex/teacher-ckpt"
tokenizer = "$ex/tokenizer"
checkpoint_every = 10
output_dir = "$d/runs"
EOF
  rm -f "$OUT/tiny-plan.json" "$OUT/tiny-report.json"
  if ! run_limited 90 "$PY" -m kdplan.cli.main plan "$d/job.toml" -o "$OUT/tiny-plan.json" --top 0 >"$LOG/b-plan.log" 2>&1; then
    FAILED=$((FAILED + 1))
    say "[b] FAIL ($(elapsed) s): kdplan plan: $(lasterr "$LOG/b-plan.log")"
    return
  fi
  layout=$("$PY" -c "
import json; p = json.load(open('$OUT/tiny-plan.json')); s = p['student']['layout']
print(f\"plan: student tp{s['tp']} pp{s['pp']} dp{s['dp']} zero{s['zero']} mb{s['micro_batch']}, kd {p['kd']['mode']} {p['kd']['placement']} {p['kd']['compression']}, {p['job']['precision']} on {p['job']['gpus']} x {p['job']['gpu_types']}\")" 2>>"$LOG/b-plan.log")
  t=$(limit 120 110)
  run_limited "$t" "$PY" -m kdplan.cli.main run "$OUT/tiny-plan.json" --steps 20 --report "$OUT/tiny-report.json" \
    >"$LOG/b-run.log" 2>&1
  rc=$?
  if [ $rc = 0 ] && [ -f "$OUT/tiny-report.json" ]; then
    local ck line
    ck=$(find "$d/runs" -maxdepth 3 -type d -name 'step_*' 2>/dev/null | wc -l)
    line=$("$PY" benchmarks/gpu_check.py report-line "$OUT/tiny-report.json" 2>>"$LOG/b-run.log" | sed -n 's/^RESULT //p')
    say "[b] OK ($(elapsed) s): ${layout:-plan: ?}; ${line:-report unreadable: $(lasterr "$LOG/b-run.log")}; checkpoints written: $ck"
  else
    [ $rc = 0 ] && rc=1  # rc 0 but no report
    count $rc
    say "[b] $(status $rc) ($(elapsed) s, limit $t s): ${layout:-plan: ?}; kdplan run: $(lasterr "$LOG/b-run.log")"
  fi
}

# ---------------------------------------------------------------------------------------------
CPU_TESTS=(tests/test_kd_losses.py tests/test_kd_compression.py tests/test_grad_hooks.py tests/test_exec_quant.py
  tests/test_exec_expert_parallel.py tests/test_overhead.py
  "tests/test_exec_models.py::test_checkpoint_load_reads_only_the_local_shard_in_the_model_dtype")
start_cpu_tests() {
  [ "$SMOKE" = 1 ] && return
  # in the background, on 4 of the CPU cores, while [c] and [d] keep the GPU busy
  OMP_NUM_THREADS=4 timeout -k 5 "$(limit 300 20)" nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "${CPU_TESTS[@]}" \
    >"$LOG/d-cputests.log" 2>&1 &
  PYTEST_PID=$!
}

stepC() {
  if [ "$HAVE_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then say "[c] SKIP: no CUDA device (see [0])"; return; fi
  local rc t prof=()
  [ -f "$OUT/profile-h200.yaml" ] && prof=("$OUT/profile-h200.yaml")
  t=$(limit 90 70)
  run_limited "$t" "$PY" benchmarks/gpu_check.py "${SMOKEFLAG[@]}" layers "$OUT/layer-times.json" "${prof[@]}" \
    --batches "$LAYER_BATCHES" >"$LOG/c-layers.log" 2>&1
  rc=$?
  count $rc
  say "[c] $(status $rc) ($(elapsed) s): one block fwd+bwd, $([ "$SMOKE" = 1 ] && echo "CPU wall clock, toy sizes" || echo "CUDA events") (bf16 weights; fp32 weights + bf16 autocast), vs kdplan.cost.compute.layer_time (bwd = 2 x fwd): $(result "$LOG/c-layers.log")$([ $rc = 0 ] || echo " | $(lasterr "$LOG/c-layers.log")")"
}

# ---------------------------------------------------------------------------------------------
stepD() {
  if [ "$HAVE_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then
    say "[d] SKIP: no CUDA device (see [0])"
  else
    local rc t
    t=$(limit 120 15)
    run_limited "$t" "$PY" benchmarks/gpu_check.py "${SMOKEFLAG[@]}" numerics "$OUT/numerics.json" >"$LOG/d-numerics.log" 2>&1
    rc=$?
    count $rc
    say "[d] $(status $rc) ($(elapsed) s): $(result "$LOG/d-numerics.log")$([ $rc = 0 ] || echo " | $(lasterr "$LOG/d-numerics.log")")"
  fi
  if [ "$SMOKE" = 1 ]; then
    say "[d-cpu] SKIP: CPU numerics tests not run in CPU smoke mode (CI runs them)"
  elif [ -n "$PYTEST_PID" ]; then
    wait "$PYTEST_PID"
    local prc=$?
    count $prc
    say "[d-cpu] $(status $prc) ($(elapsed) s): CPU numerics tests under this torch (${CPU_TESTS[*]##*/}): $(grep -aE "passed|failed|error" "$LOG/d-cputests.log" | tail -n 1 | tr -s ' ')"
  else
    say "[d-cpu] SKIP: not started (no CUDA)"
  fi
}

# ---------------------------------------------------------------------------------------------
# [e] issue 16 on the device, one process: two students fed by one teacher forward per batch, and
# a 3-epoch offline run of both students that writes the teacher-output cache in epoch 1 and reads
# it in epochs 2-3 (each step's cached targets read and prepared once for both students)
stepE() {
  if [ "$HAVE_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then say "[e] SKIP: no CUDA device (see [0])"; return; fi
  local d=$WORK/jobs ex=$REPO/examples/tiny-cpu rc t cluster=dgx-h200 prec=bf16 line
  [ "$SMOKE" = 1 ] && { cluster=cpu-local; prec=fp32; }
  mkdir -p "$d"
  cat >"$d/job.toml" <<EOF
teacher = "$ex/teacher/config.json"
student = "$ex/student/config.json"
cluster = "$cluster"
gpus = 1
seq_len = 128
global_batch = 8
precision = "$prec"

[run]
steps = 6
seed = 0
teacher_checkpoint = "$ex/teacher-ckpt"
tokenizer = "$ex/tokenizer"
output_dir = "$d/runs"
EOF
  t=$(limit 150 40)
  run_limited "$t" bash -c '
    set -e
    "$1" -m kdplan.cli.main plan "$2/job.toml" --student "$3/student/config.json" --student "$3/student-b/config.json" \
      --tokens 1e6 --top 0 -o "$4/multi-plan.json"
    "$1" -m kdplan.cli.main run "$4/multi-plan.json" --steps 6 --report "$4/multi-report.json"
    "$1" -m kdplan.cli.main plan "$2/job.toml" --student "$3/student/config.json" --student "$3/student-b/config.json" \
      --fix kd.mode=offline --dataset-tokens 4096 --tokens 12288 --top 0 -o "$4/epochs-plan.json"
    "$1" -m kdplan.cli.main run "$4/epochs-plan.json" --steps 12 --report "$4/epochs-report.json"
  ' _ "$PY" "$d" "$ex" "$OUT" >"$LOG/e-jobs.log" 2>&1
  rc=$?
  count $rc
  line=$("$PY" - "$OUT/multi-report.json" "$OUT/epochs-report.json" 2>>"$LOG/e-jobs.log" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))["measured"]
e = json.load(open(sys.argv[2]))["measured"]
names = ", ".join(s["student"].split("/")[-2] if s["student"].endswith(".json") else s["student"]
                  for s in m.get("students", []))
tp = m.get("teacher_phase_s")
print(f"two students in one run ({names}; teacher phase {'-' if tp is None else f'{tp:.4f}'} s/step, step {m['step_time_s']:.4f} s); "
      f"offline 3 epochs of 4 steps, {max(len(e.get('students', [])), 1)} student(s): {e['step_time_s']:.4f} s/step")
PYEOF
)
  say "[e] $(status $rc) ($(elapsed) s): ${line:-no report} $([ $rc = 0 ] || echo "| $(lasterr "$LOG/e-jobs.log")")"
}

# ---------------------------------------------------------------------------------------------
cleanup() {
  [ -n "$PYTEST_PID" ] && kill "$PYTEST_PID" 2>/dev/null
  rm -rf "$WORK"  # its logs are in $OUT/logs.txt
}
trap cleanup EXIT
step0
stepA
stepB
start_cpu_tests
stepC
stepD
stepE
{
  for f in "$LOG"/*.log; do
    echo "===== $(basename "$f") (last 120 lines)"
    tail -n 120 "$f" | cut -c1-2000
  done
} >"$OUT/logs.txt" 2>/dev/null
say "[end] $(elapsed) s in all, $FAILED step(s) failed; summary and logs in $OUT"
[ "$FAILED" = 0 ]
