"""Fuzz the artifacts kdplan reads back: plan JSON (inspect, simulate, the executor's launch
checks) and run report JSON (calibrate). Both start from objects built by hand from
kdplan.schema, so the suite does not depend on the solver's current choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from executor import launch
from fuzzing import check, damaged, dump, fuzz_settings, invoke, mutated, tiny_llama, write
from kdplan.errors import InputError
from kdplan.io import load_model
from kdplan.models import from_hf_config
from kdplan.schema import (JobSummary, KDPlan, Layout, LossPoint, Measured, Plan, PlanRef, Prediction, RolePlan,
                           RunReport, SolverInfo, Stage)


def hand_plan() -> Plan:
    """Offline KD of a 4-layer teacher into a 2-layer student on 2 cpu-local processes."""
    def role(cfg: dict, source: str) -> RolePlan:
        layers = cfg["num_hidden_layers"]
        zero = 1 if source == "student.json" else 0  # the forward-only teacher has no ZeRO-1 (launch refuses it)
        layout = Layout(tp=1, pp=1, dp=2, zero=zero, micro_batch=2, num_gpus=2, ranks=[0, 1],
                        stages=[Stage(first_layer=0, last_layer=layers, ranks=[0, 1], gpu="cpu-core")])
        return RolePlan(source=source, model=from_hf_config(cfg, source), layout=layout)

    return Plan(
        job=JobSummary(cluster="cpu-local", gpus=2, gpus_per_node=2, gpu_types=["cpu-core"], device_kind="cpu",
                       seq_len=128, global_batch=8, precision="fp32"),
        teacher=role(tiny_llama(num_hidden_layers=4, hidden_size=128), "teacher.json"),
        student=role(tiny_llama(), "student.json"),
        kd=KDPlan(mode="online", placement="colocated", compression="topk:16:8", temperature=2.0),
        prediction=Prediction(step_time_s=0.5, tokens_per_s=2048.0, mfu=0.01, memory_per_gpu_gib=0.4,
                              comm_bytes_per_step=1e6, utilization=0.9,
                              breakdown_s={"compute": 0.45, "comm_gradients": 0.05},
                              bytes_per_step={"gradients": 8e5, "teacher_outputs": 2e5}),
        solver=SolverInfo(name="fixed", status="fixed", num_candidates=1), world_size=2)


PLAN = json.loads(hand_plan().model_dump_json())


@st.composite
def plan_case(draw, base: dict):
    if draw(st.integers(0, 3)) == 0:
        return draw(damaged(json.dumps(base))), None
    data, leaf = draw(mutated(base))
    return dump(data, ".json"), leaf


PLAN_READERS = {"inspect": [], "simulate": [], "run": ["--print-command"]}


@pytest.mark.parametrize("command", sorted(PLAN_READERS))
def test_hand_plan_is_valid(tmp_path, command):
    """The fuzzers' starting point is accepted as is."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    args = [command, path, *PLAN_READERS[command]]
    assert check(invoke(args), args=args) == 0


@pytest.mark.parametrize("command", sorted(PLAN_READERS))
def test_fuzz_plan_json(tmp_path, command):
    codes = Counter()
    path = tmp_path / "plan.json"
    args = [command, path, *PLAN_READERS[command]]

    @fuzz_settings(60)
    @given(case=plan_case(PLAN))
    def one(case):
        content, leaf = case
        write(path, content)
        codes[check(invoke(args), names="plan.json", field=leaf, args=args)] += 1

    one()
    assert codes[2], codes


def test_simulate_names_plan_field_of_unknown_cluster(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**PLAN, "job": {**PLAN["job"], "cluster": "no-such-cluster"}}))
    assert check(invoke(["simulate", path]), names="plan.json", field="cluster", args=["simulate", path]) == 2


def test_simulate_refuses_absurd_gpu_count(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**PLAN, "job": {**PLAN["job"], "gpus": 10**30}}))
    assert check(invoke(["simulate", path]), names="plan.json", field="gpus", args=["simulate", path]) == 2


def executor_reads(path) -> str:
    """'ok', or 'refused: <one line>': the executor's loader, then its launch checks for the plan's
    own world size and device (imported without torch; no process group is started). Anything
    else the executor raises on a plan it read is a crash and fails the caller."""
    try:
        plan = launch.load_plan(str(path))
        launch.check(plan, world_size=plan.world_size, device="cuda" if plan.job.device_kind == "gpu" else "cpu")
    except launch.Refused as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1, msg
        return f"refused: {msg}"
    return "ok"


def test_fuzz_executor_plan_loader(tmp_path):
    """executor.launch reads plans itself (it depends on kdplan.schema only): same contract, its
    Refused error (exit 2) in place of InputError; a plan its loader accepts must also pass its
    launch checks or be refused by them (never crash there)."""
    path = tmp_path / "plan.json"
    codes = Counter()

    @fuzz_settings(60)
    @given(case=plan_case(PLAN))
    def one(case):
        content, _ = case
        write(path, content)
        try:
            launch.load_plan(str(path))
        except launch.Refused as e:
            msg = str(e)
            assert "plan.json" in msg and len(msg.splitlines()) == 1, msg
            codes["refused by the loader"] += 1
            return
        codes[executor_reads(path).split(":")[0]] += 1

    one()
    assert codes["refused by the loader"] and codes["ok"], codes


# ---- issue 18 finding 2: a malformed teacher-output format in a plan is bad input ------------------

MALFORMED_COMPRESSION = ["sparse:4", "x|", "topk:abc", "topk:0", ""]


def _bad_compression_plan(tmp_path, value):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**PLAN, "kd": {**PLAN["kd"], "compression": value}}))
    return path


@pytest.mark.parametrize("value", MALFORMED_COMPRESSION)
def test_malformed_compression_precondition(tmp_path, value):
    """The plans below differ from the valid hand plan in kd.compression only, and the one
    compression parser refuses the value (exit 1 from inspect/simulate before issue 14's fix)."""
    from kdplan.schema.compression import parse_compression
    data = json.loads(_bad_compression_plan(tmp_path, value).read_text())
    assert {k: v for k, v in data["kd"].items() if k != "compression"} == \
        {k: v for k, v in PLAN["kd"].items() if k != "compression"}
    with pytest.raises(ValueError):
        parse_compression(value)


@pytest.mark.parametrize("command", sorted(PLAN_READERS))
@pytest.mark.parametrize("value", MALFORMED_COMPRESSION)
def test_malformed_compression_in_plan_is_refused(tmp_path, command, value):
    path = _bad_compression_plan(tmp_path, value)
    args = [command, path, *PLAN_READERS[command]]
    assert check(invoke(args), names="plan.json", field="compression", args=args) == 2


@pytest.mark.parametrize("value", MALFORMED_COMPRESSION)
def test_executor_refuses_malformed_compression(tmp_path, value):
    got = executor_reads(_bad_compression_plan(tmp_path, value))
    assert got.startswith("refused") and "compression" in got, got


# ---- a plan that does not match the launch is refused before any process group starts --------

def _launch(plan_path, world_size: int, *extra):
    env = dict(os.environ, WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "executor.launch", str(plan_path), "--no-progress", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


MISMATCH = [
    ("world-size", {}, 3, "WORLD_SIZE=3"),
    ("schema-version", {"schema_version": "0.1"}, 2, "schema version"),
    ("device", {"job": {**PLAN["job"], "device_kind": "gpu"}}, 2, "CUDA"),
    ("vocab", {"teacher": {**PLAN["teacher"], "model": {**PLAN["teacher"]["model"], "vocab_size": 999}}}, 2,
     "vocabulary"),
    ("ranks", {"student": {**PLAN["student"], "layout": {**PLAN["student"]["layout"], "ranks": [0, 7]}}}, 2,
     "ranks"),
]


@pytest.mark.parametrize("name,change,world,needle", MISMATCH, ids=[m[0] for m in MISMATCH])
def test_launch_refuses_mismatched_plan(tmp_path, name, change, world, needle):
    if name == "device":
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: a GPU plan is not a mismatch here")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**PLAN, **change}))
    r = _launch(path, world, "--output-dir", tmp_path / "run")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before preparing anything


# ---- run reports ----------------------------------------------------------------------------

def hand_report() -> RunReport:
    return RunReport(plan=PlanRef(path="plan.json", sha256="0" * 64), world_size=2, device="cpu (gloo)", steps=4,
                     warmup_steps=1,
                     measured=Measured(step_time_s=0.6, step_times_s=[0.9, 0.6, 0.6, 0.61], tokens_per_s=1700.0,
                                       utilization=0.8, peak_memory_gib=0.3, bytes_per_step={"gradients": 8e5},
                                       loss=[LossPoint(step=i, total=5.0 - i / 10, kd=1.0, ce=6.0) for i in range(4)]),
                     predicted=Prediction(**PLAN["prediction"]))


REPORT = json.loads(hand_report().model_dump_json())


def test_fuzz_report_loader(tmp_path):
    """Every mutated report either loads or is refused with one line naming the file."""
    path = tmp_path / "report.json"
    codes = Counter()

    @fuzz_settings(100)
    @given(case=plan_case(REPORT))
    def one(case):
        content, leaf = case
        write(path, content)
        try:
            load_model(RunReport, path)
            codes["ok"] += 1
        except InputError as e:
            msg = str(e)  # (one line is the CLI's job: run_cli escapes line breaks a key carried in)
            assert "report.json" in msg, msg
            assert leaf is None or leaf in msg, (leaf, msg)
            codes["refused"] += 1

    one()
    assert codes["ok"] and codes["refused"], codes


def test_fuzz_calibrate_reports(tmp_path):
    """`kdplan calibrate REPORT` on mutated reports (the plan beside it is the valid one)."""
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    path = tmp_path / "report.json"
    args = ["calibrate", path, "--cluster", "cpu-local", "-o", tmp_path / "cal.yaml"]
    codes = Counter()

    @fuzz_settings(25)  # a valid report costs a calibration fit (~0.5 s)
    @given(case=plan_case(REPORT))
    def one(case):
        content, leaf = case
        write(path, content)
        codes[check(invoke(args, timeout_s=60), names="report.json", field=leaf, args=args)] += 1

    one()
    assert codes[2], codes
