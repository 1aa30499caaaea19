"""Launch-time checks: a plan that does not match the launch is refused before any work, in one
line, with exit 2; `kdplan run` builds the torchrun / Slurm command without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from exec_helpers import ROOT, STUDENT, layout, make_plan, make_teacher_checkpoint, with_baselines, write_plan


def _launch_env(world: int | None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    if world is not None:
        env["WORLD_SIZE"] = str(world)
    return env


def _refused(plan_path, *args, world=None, timeout=60) -> str:
    r = subprocess.run([sys.executable, "-m", "executor.launch", str(plan_path), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=_launch_env(world))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


def test_world_size_mismatch_is_refused_before_init(tmp):
    plan = write_plan(tmp / "p4.json", make_plan(tmp, layout(dp=4)))
    msg = _refused(plan, "--steps", 1, world=2)
    assert "needs 4 processes" in msg and "WORLD_SIZE=2" in msg
    assert not (tmp / "out").exists()  # nothing prepared: refused before any work


def test_models_that_do_not_match_are_refused(tmp):
    wrong = tmp / "wrong-teacher"
    from executor.models import build_model, materialize, save_checkpoint
    save_checkpoint(materialize(build_model(STUDENT), seed=0), wrong)  # the student's shape, not the teacher's
    plan = write_plan(tmp / "wrong.json", make_plan(tmp, layout(), teacher_ckpt=wrong))
    assert "hidden_size = 32 but the plan's model has 64" in _refused(plan, world=1)

    p = make_plan(tmp, layout(), teacher_ckpt=make_teacher_checkpoint(tmp / "teacher"))
    bad = p.model_copy(update={"teacher": p.teacher.model_copy(
        update={"model": p.teacher.model.model_copy(update={"vocab_size": 512})})})
    assert "vocabulary" in _refused(write_plan(tmp / "vocab.json", bad), world=1)

    tp3 = make_plan(tmp, layout(tp=3))
    assert "tp=3 does not divide" in _refused(write_plan(tmp / "tp3.json", tp3), world=3)


def test_schema_version_and_garbage_are_refused(tmp):
    data = json.loads(make_plan(tmp, layout()).model_dump_json())
    data["schema_version"] = "0.1"
    (tmp / "old.json").write_text(json.dumps(data))
    assert "schema version" in _refused(tmp / "old.json", world=1)
    (tmp / "garbage.json").write_text("{not json")
    assert "invalid JSON" in _refused(tmp / "garbage.json", world=1)
    assert "cannot read" in _refused(tmp / "missing.json", world=1)


def _kdplan(*args):
    return subprocess.run([sys.executable, "-m", "kdplan.cli.main", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_run_prints_the_torchrun_command_and_a_slurm_script_for_multi_node(tmp):
    plan = write_plan(tmp / "p2.json", with_baselines(make_plan(tmp, layout(dp=2)), naive_dp=layout(dp=2),
                                                      single=layout()))
    r = _kdplan("run", plan, "--steps", 3, "--print-command", "--baseline", "naive-dp")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("torchrun --standalone --nproc_per_node=2 -m executor.launch")
    assert "--baseline naive-dp" in r.stdout and "#SBATCH" not in r.stdout
    r = _kdplan("run", plan, "--baseline", "single", "--print-command")
    assert "--nproc_per_node=1" in r.stdout

    big = make_plan(tmp, layout(dp=16))
    big = big.model_copy(update={"job": big.job.model_copy(update={"gpus_per_node": 8, "device_kind": "gpu"})})
    r = _kdplan("run", write_plan(tmp / "p16.json", big), "--print-command")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "--rdzv_backend=c10d" in r.stdout and "--nnodes=2" in r.stdout
    r = _kdplan("run", tmp / "p16.json")
    assert r.returncode == 2 and "Slurm" in r.stderr


def test_a_baseline_run_runs_the_layout_the_plan_priced_and_reports_its_prediction(tmp):
    """naive DP priced at micro-batch 1 (the plan runs 2): the run uses micro-batch 1 and its
    report carries the baseline's own prediction, not the plan's."""
    from exec_helpers import launch, read_report
    plan = with_baselines(make_plan(tmp, layout(dp=2, mb=2), teacher_ckpt=make_teacher_checkpoint(tmp / "teacher")),
                          naive_dp=layout(dp=2, mb=1), step_time_s=(0.625, 0.9, 0.7))
    path = write_plan(tmp / "base.json", plan)
    r = launch(path, 2, "--baseline", "naive-dp", "--steps", 2, "--report", tmp / "base-report.json")
    assert r.returncode == 0, r.stderr[-4000:]
    rep = read_report(tmp / "base-report.json")
    assert rep["baseline"] == "naive-dp" and rep["world_size"] == 2
    assert rep["predicted"]["step_time_s"] == 0.625 and rep["predicted"]["step_time_s"] != plan.prediction.step_time_s
    assert "student tp1 pp1 dp2 zero0 mb1" in rep["layout_summary"] and "kd online colocated dense" in rep["layout_summary"]
    # a baseline the cost model found no layout for is refused in one line, naming why
    assert "mirror baseline cannot run (not in this test)" in _refused(path, "--baseline", "mirror", world=2)
    r = _kdplan("run", path, "--baseline", "mirror")
    assert r.returncode == 2 and "cannot run" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_bad_input_in_one_line(tmp):
    plan = write_plan(tmp / "p2b.json", make_plan(tmp, layout(dp=2)))
    r = _kdplan("run", plan, "--nproc", 3)
    assert r.returncode == 2 and "needs 2" in r.stderr and "Traceback" not in r.stderr
    r = _kdplan("run", tmp / "nope.json")
    assert r.returncode == 2 and "no such file" in r.stderr
    wrong = make_plan(tmp, layout(dp=2), teacher_ckpt=tmp / "does-not-exist")
    r = _kdplan("run", write_plan(tmp / "nockpt.json", wrong))
    assert r.returncode == 2 and "teacher checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_cli_run_module_does_not_import_torch():
    code = "import sys, kdplan.cli.run; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
