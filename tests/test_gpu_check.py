"""benchmarks/gpu_check.sh, the device check the lead runs once on a real GPU: run here in its CPU
smoke mode (GPU_CHECK_CPU_SMOKE=1: [c] and [d] at toy sizes on the CPU) so that a broken script is
caught in CI, not on the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.executor


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_report_line_reads_a_run_report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import report_line
    finally:
        sys.path.pop(0)
    r = {"world_size": 1, "device": "cuda", "torch_version": "2.11.0", "steps": 20,
         "measured": {"step_time_s": 0.05, "tokens_per_s": 40000.0, "peak_memory_gib": 1.5,
                      "bytes_per_step": {"gradients": 10.0}, "loss": [{"total": 9.0, "ce": 9.1, "kd": 8.0},
                                                                      {"total": 6.0, "ce": 6.5, "kd": 5.0}]},
         "predicted": {"step_time_s": 0.04, "tokens_per_s": 50000.0, "memory_per_gpu_gib": 1.2,
                       "comm_bytes_per_step": 0.0}}
    line = report_line(r)
    assert "measured 50.0 ms/step vs predicted 40.0 ms (x1.25)" in line and "loss 9.000 -> 6.000" in line


@pytest.mark.slow
def test_cpu_smoke_run_of_the_whole_script(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_CPU_SMOKE="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="2",
               PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:] + (out / "logs.txt").read_text()[-4000:]
    lines = {ln.split(" ", 1)[0]: ln for ln in summary.splitlines()}
    assert set(lines) == {"[0]", "[a]", "[b]", "[c]", "[d]", "[d-cpu]", "[e]", "[end]"}, summary  # one line per step
    assert lines["[0]"].startswith("[0] OK") and "kdplan+executor import OK" in lines["[0]"]
    assert lines["[c]"].startswith("[c] OK") and lines["[d]"].startswith("[d] OK"), summary
    # issue 16 on the device: the two-student run's report names both students; the offline run ran
    assert lines["[e]"].startswith("[e] OK") and "(student, student-b;" in lines["[e]"], summary
    assert "FAIL" not in lines["[d]"] and "0 host syncs" in lines["[d]"] and "0/8 buckets averaged wrong" in lines["[d]"]
    layers = json.loads((out / "layer-times.json").read_text())
    assert {x["model"] for x in layers} == {"gpt-1.3b", "gpt-13b", "llama-3-8b"}
    assert all(x["bf16 fwd+bwd s"] > 0 and x["pred shipped h200 fwd+bwd s"] > 0
               for x in layers)
    checks = json.loads((out / "numerics.json").read_text())["checks"]
    assert checks and all(c["ok"] for c in checks.values()), checks
    # what comes back from the device: at most 8 files, plain names
    names = [p.name for p in out.iterdir()]
    assert len(names) <= 8 and all(n.replace(".", "").replace("-", "").replace("_", "").isalnum() for n in names)
