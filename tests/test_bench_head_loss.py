"""executor.bench's head-and-loss measurement (issue 13 item 5) on this CPU: the fields `kdplan
profile` fits GPUSpec.loss_size_factor and loss_heap_copies from (kdplan.calibrate.profile.
fit_head_loss). Counted in bytes and present fields, never in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_heap_probe_counts_the_step_s_resident_heap():
    """A fresh process's heap after the step at 256 x 4096 fp32 logits (4 MiB a copy): at least
    the logits, their gradient and the teacher's (3 copies), and less than the whole process."""
    out = {}
    for tokens in (64, 256):
        r = subprocess.run([sys.executable, "-m", "executor.bench.run", "--heap-probe", f"{tokens},32,4096,dense"],
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        out[tokens] = int(r.stdout.split()[-1])
    copy = 256 * 4096 * 4
    assert 3 * copy <= out[256] < 2**31
    assert out[256] > out[64]  # grows with the logits


def test_bench_writes_the_head_loss_fields(tmp_path):
    spec = {"gemms": [], "attention": [], "dtypes": ["fp32"], "memory_bytes": 2**20, "ops": [], "sizes": [],
            "min_time_s": 0.01, "comm_budget_bytes": 2**20, "device": "cpu",
            "head_loss": {"hidden": 32, "vocab": 1024, "tokens": [16, 32], "kind_tokens": 32, "kinds": ["none", "sample:64"]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "-m", "executor.bench.run", "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "raw.json")],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PROGRESS 5 5 head and loss (sample:64), 32 x 1024 logits" in r.stdout  # 1 memory copy + 4 points
    raw = json.loads((tmp_path / "raw.json").read_text())
    pts = raw["head_loss"]
    assert [(x["tokens"], x["kind"]) for x in pts] == [(16, "dense"), (32, "dense"), (32, "none"), (32, "sample")]
    for x in pts:
        assert x["elements"] == x["tokens"] * 1024 and x["time_s"] > 0 and x["clock"] == "process_time"
        assert x["heap_bytes"] is not None and x["heap_bytes"] >= 0
    # the profile's fit reads them as they are written
    from kdplan.calibrate.profile import fit_head_loss
    from kdplan.profiles import load_cluster
    cl = load_cluster("cpu-local")
    gpu = fit_head_loss(pts, cl.gpu_of_group(0), cl.overheads.loss_bytes_per_s_fraction)
    assert sorted(gpu.loss_size_factor) == [0.0625, 0.125] and gpu.loss_size_factor[0.0625] == 1.0
    assert set(gpu.loss_heap_copies) == {"dense", "none", "sample"}
