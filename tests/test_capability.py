"""Plans the executor cannot run are marked at plan time (Plan.executor), `kdplan plan --runnable`
leaves them out, and the marking is what the executor really refuses.

One table (kdplan.schema.capability) feeds both sides. Here each feature is reached the way a
user reaches it (a --fix pin or a job setting the planner honours), or, where the planner never
chooses it, by editing a planned plan; then:

- the plan is marked, with the feature's line first (the line the executor prints);
- ``python -m executor.launch PLAN --check-only`` (the executor's own check, as `kdplan run`
  starts it; a subprocess, so this file stays torch-free) refuses it with exactly that line, and
  accepts the plan planned without the pin;
- with --runnable the same request is refused at plan time (exit 3, naming --runnable), or the
  plan chosen instead is runnable.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_kdplan

from kdplan.errors import Infeasible
from kdplan.jobs import load_job, resolve
from kdplan.planner import make_plan
from kdplan.schema import Plan
from kdplan.schema.capability import FEATURES, executor_check, unsupported
from kdplan.schema.plan import JobPrediction, StudentJob
from kdplan.search.choose import TIE_TOLERANCE

TINY = "examples/tiny-cpu/job.toml"
QWEN = {"teacher": "qwen3-8b", "student": "qwen3-1.7b", "cluster": "dgx-h100", "gpus": 8, "global_batch": 64,
        "seq_len": 2048}

# feature -> (job file, overrides, pins) that ask for it
PINNED = {
    "student_offload": (TINY, {}, ["student.offload=optimizer"]),
    "hsdp": (TINY, {}, ["student.shard_group=1", "student.zero=3", "student.dp=2"]),
    "context_parallel": (TINY, {}, ["student.cp=2"]),
    "teacher_offload_tp": (TINY, {}, ["teacher.offload=weights", "teacher.tp=2"]),
    "teacher_zero3_offload": (TINY, {}, ["teacher.offload=weights", "teacher.zero=3", "teacher.dp=2"]),
    "sequence_kd": (TINY, {}, ["kd.signal=sequence"]),
    "fp16": (TINY, {"precision": "fp16"}, []),
    "family_layout": (None, QWEN, ["teacher.tp=2"]),
}


def _plan(job, overrides, pins, runnable=False) -> Plan:
    ov = dict(overrides, **({"solver.runnable": True} if runnable else {}))
    return make_plan(resolve(load_job(job), overrides=ov, pins=pins, job_path=job), top_k=0)


def check_only(plan: Plan, tmp_path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(plan.model_dump_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "executor.launch", str(path), "--check-only", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def _assert_marked(plan: Plan, feature: str) -> None:
    found = unsupported(plan)
    assert plan.executor is not None and not plan.executor.runnable
    assert plan.executor.unsupported == [u.message for u in found]
    assert feature in [u.feature for u in found], [u.feature for u in found]
    assert all(u.feature in FEATURES and "\n" not in u.message for u in found)


@pytest.mark.parametrize("feature", sorted(PINNED))
def test_a_plan_with_a_feature_the_executor_refuses_is_marked_and_refused_with_that_line(feature, tmp_path):
    job, ov, pins = PINNED[feature]
    plan = _plan(job, ov, pins)
    _assert_marked(plan, feature)
    r = check_only(plan, tmp_path, feature)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {plan.executor.unsupported[0]}", (r.stderr, plan.executor.unsupported)
    # --runnable: refused at plan time when the pin or the job asks for it
    with pytest.raises(Infeasible, match="--runnable"):
        _plan(job, ov, pins, runnable=True)


@pytest.mark.parametrize("job, overrides", [(TINY, {}), (None, QWEN)], ids=["tiny-cpu", "qwen3-8b-1.7b"])
def test_an_unpinned_plan_is_marked_runnable_and_the_executor_accepts_it(job, overrides, tmp_path):
    plan = _plan(job, overrides, [])
    assert plan.executor.runnable and plan.executor.unsupported == [] and unsupported(plan) == []
    r = check_only(plan, tmp_path, "plain")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


SCENARIOS = {"tiny-cpu": (TINY, {}), "qwen3-8b-on-2-a100-40g": (None, dict(QWEN, cluster="dgx-a100-40g", gpus=2,
                                                                              seq_len=4096, global_batch=16))}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_runnable_plans_only_what_the_executor_runs_and_costs_nothing_when_the_best_plan_runs(name, tmp_path):
    """--runnable gives a runnable plan the executor accepts; where the unrestricted plan is runnable
    too it is as fast (the filtered set still holds it), else no faster, up to the planner's 1%
    tie tolerance (ties go to fidelity). Which layout wins moves with every refit of the cost
    model (before main's FSDP refit the Qwen3-8B teacher here was split tp = 2, which the executor
    does not run for Qwen3), so this holds for whatever the planner chooses."""
    job, ov = SCENARIOS[name]
    free, runnable = _plan(job, ov, []), _plan(job, ov, [], runnable=True)
    assert runnable.executor.runnable and unsupported(runnable) == []
    r = check_only(runnable, tmp_path, "runnable")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    step, best = runnable.prediction.step_time_s, free.prediction.step_time_s
    assert step >= best * (1 - TIE_TOLERANCE)
    if free.executor.runnable:
        assert step <= best * (1 + TIE_TOLERANCE)


def test_runnable_refuses_a_job_only_unrunnable_layouts_fit():
    """Llama-3-8B trained alone on one 40 GB A100 fits only with its optimizer state in host memory
    (16 bytes per parameter: 128 GB of model states): the plan is marked, and --runnable says that
    nothing the executor runs fits (exit 3), naming --runnable."""
    alone = dict(student="llama-3-8b", cluster="dgx-a100-40g", gpus=1, global_batch=8, seq_len=2048)
    job = load_job(None).model_copy(update={"teacher": None})
    _assert_marked(make_plan(resolve(job, overrides=alone), top_k=0), "student_offload")
    with pytest.raises(Infeasible, match="--runnable"):
        make_plan(resolve(job, overrides=dict(alone, **{"solver.runnable": True})), top_k=0)


@pytest.mark.parametrize("feature, edit", [
    ("int8_grads_zero", lambda p: p.student.layout.model_copy(update={"grad_compression": "int8", "zero": 1})),
    ("teacher_zero", lambda p: p.teacher.layout.model_copy(update={"zero": 2})),
    ("teacher_training_knobs", lambda p: p.teacher.layout.model_copy(update={"recompute": "full"})),
    ("teacher_optimizer_offload", lambda p: p.teacher.layout.model_copy(update={"offload": "optimizer"})),
    ("job_students", None),
])
def test_what_the_planner_never_chooses_is_marked_the_same_way(feature, edit, tmp_path):
    """The search leaves these out by itself (candidates._variants), or the job chooses them
    (several students run one after another); edited into a plan, the table still marks them and
    the executor refuses them with the same line."""
    plan = _plan(TINY, {}, ["student.dp=2"])
    if feature == "job_students":
        job = JobPrediction(strategy="separate_online", total_time_s=1.0, teacher_passes=2, dataset_tokens=1,
                            tokens_per_student=1, epochs=1,
                            students=[StudentJob(student="a", step_time_s=1, steps=1),
                                      StudentJob(student="b", step_time_s=1, steps=1)])
        plan.prediction.job = job
    else:
        lay = edit(plan)
        role = "student" if feature == "int8_grads_zero" else "teacher"
        setattr(plan, role, getattr(plan, role).model_copy(update={"layout": lay}))
    plan = Plan.model_validate(plan.model_dump(mode="json") | {"executor": None})
    plan.executor = executor_check(plan)
    _assert_marked(plan, feature)
    r = check_only(plan, tmp_path, feature)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {plan.executor.unsupported[0]}", r.stderr


def test_plan_prints_whether_kdplan_run_executes_it(tmp_path):
    r = run_kdplan("plan", TINY, "--fix", "student.offload=optimizer", "-o", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert "cannot execute this plan" in r.stdout and "student.layout.offload = optimizer" in r.stdout
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["executor"]["runnable"] is False and saved["executor"]["unsupported"]
    r = run_kdplan("plan", TINY, "--fix", "student.offload=optimizer", "--runnable", "-o", tmp_path / "q.json")
    assert r.returncode == 3 and "--runnable" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "q.json").exists()
    r = run_kdplan("plan", TINY, "--runnable", "-o", tmp_path / "q.json")
    assert r.returncode == 0 and "`kdplan run` executes this plan" in r.stdout, r.stderr
