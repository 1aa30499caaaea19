"""Students one after another in one run (issue 16; capability.students_one_after_another).

An offline whole job whose prediction.job.students_arrangement is one_after_another carries every
student's own step plan (plan.extra_students with layouts of their own: here student A data
parallel over 2 ranks, micro-batch 2, and student B of another size tensor parallel over the same 2
ranks, micro-batch 1: a mesh A's run never builds). `kdplan run` runs one teacher pass writing the
cache, then A all its steps, then B all its steps, each reading the cache.

- 2 gloo processes, 16 samples, 4 steps (2 epochs): each student's per-step (total, kd, ce) losses
  equal those of a separate single-student offline run of it (own output directory, own cache and
  teacher pass, same seed and data order) within 1e-6 of the step's total loss (the tolerance
  test_exec_multi_student.py states for offline students: a top-k:16 8-bit target decodes to the
  same numbers; only summation orders may differ);
- the teacher runs once (one pass line, every sample written once) and the report carries each
  student's losses, step times and bytes, and the bytes the pass wrote to the cache
  (Measured.cache_write_bytes: the same as a single-student offline run's, > 0);
- the capability table runs such a plan and refuses what it cannot (an online kd.mode, a student on
  other ranks, another vocabulary), and the in-turn rules (one shared tp / dp) do not apply to it.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from exec_helpers import TEACHER, launch, layout, make_plan, make_teacher_checkpoint, read_report, spec, write_plan  # noqa: E402

from kdplan.schema import Plan, RolePlan  # noqa: E402
from kdplan.schema.capability import (job_students_unsupported, students_one_after_another,  # noqa: E402
                                      unsupported)
from kdplan.schema.plan import JobPrediction, StudentJob  # noqa: E402

STUDENT_B = spec("tiny-student-b", 2, 48)
ROWS, STEPS, FMT = 16, 4, "topk:16:8"


def sequential_plan(tmp) -> Plan:
    a = layout(dp=2, mb=2, ranks=[0, 1])
    b = layout(tp=2, dp=1, mb=1, ranks=[0, 1], layers=STUDENT_B.num_layers)
    teacher = layout(dp=2, mb=2, ranks=[0, 1], layers=TEACHER.num_layers)
    plan = make_plan(tmp, a, teacher, teacher_ckpt=make_teacher_checkpoint(tmp.parent / "teacher"), mode="offline",
                     compression=FMT)
    job = JobPrediction(strategy="offline", students_arrangement="one_after_another", total_time_s=1.0,
                        teacher_passes=1, dataset_tokens=ROWS * 32, tokens_per_student=STEPS * 8 * 32,
                        epochs=2, cache_format=FMT,
                        students=[StudentJob(student="test", step_time_s=0.1, steps=STEPS),
                                  StudentJob(student="student-b", step_time_s=0.1, steps=STEPS)])
    return plan.model_copy(update={
        "job": plan.job.model_copy(update={"dataset_tokens": ROWS * 32}),
        "extra_students": [RolePlan(source="student-b", model=STUDENT_B, layout=b)],
        "prediction": plan.prediction.model_copy(update={"job": job})})


def terms(points: list[dict]) -> list[tuple[float, float, float]]:
    return [(p["total"], p["kd"], p["ce"]) for p in points]


def close(got, want, rel: float) -> bool:
    """Every (total, kd, ce) term within ``rel`` of the step's total loss."""
    return len(got) == len(want) == STEPS and all(
        abs(g - w) <= rel * max(abs(ws[0]), 1e-12) for gs, ws in zip(got, want) for g, w in zip(gs, ws))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq")
    plan, out = sequential_plan(tmp), {}
    for name, p in (("seq", plan), ("a", plan.student_alone(0)), ("b", plan.student_alone(1))):
        path = write_plan(tmp / f"{name}.json", p)
        r = launch(path, 2, "--steps", STEPS, "--report", tmp / f"{name}.report.json", "--output-dir", tmp / name)
        assert r.returncode == 0, r.stderr[-4000:]
        out[name] = (read_report(tmp / f"{name}.report.json"), r.stderr)
    return out


def test_each_student_trains_as_a_separate_offline_run_of_it(runs):
    m = runs["seq"][0]["measured"]
    assert [s["student"] for s in m["students"]] == ["test", "student-b"]
    a, b = (terms(s["loss"]) for s in m["students"])
    assert a != b  # two different students, not one reported twice
    assert close(a, terms(runs["a"][0]["measured"]["loss"]), 1e-6), (a, runs["a"][0]["measured"]["loss"])
    assert close(b, terms(runs["b"][0]["measured"]["loss"]), 1e-6), (b, runs["b"][0]["measured"]["loss"])
    assert terms(m["loss"]) == a  # the report's loss stays `student`'s


def test_one_teacher_pass_and_the_cache_writes_in_the_report(runs):
    seq_err = runs["seq"][1]
    passes = re.findall(r"(\d+) samples written, (\d+) found cached", seq_err)
    assert passes == [(str(ROWS), "0")], seq_err[-2000:]  # the teacher over each sample once, for both students
    written = {n: runs[n][0]["measured"]["cache_write_bytes"] for n in ("seq", "a", "b")}
    # the same samples in the same format, whoever's plan ran the pass
    assert written["seq"] > 0 and written["seq"] == written["a"] == written["b"]


def test_report_has_each_students_own_times_and_bytes(runs):
    m = runs["seq"][0]["measured"]
    a, b = m["students"]
    assert a["step_time_s"] > 0 and b["step_time_s"] > 0 and m["teacher_phase_s"] is None
    assert len(a["step_times_s"]) == len(b["step_times_s"]) == len(m["step_times_s"]) == STEPS
    # step i of the run: A's step i then B's on each rank, the slowest rank's sum (each student's: its slowest rank)
    for t, x, y in zip(m["step_times_s"], a["step_times_s"], b["step_times_s"]):
        assert max(x, y) <= t * (1 + 1e-9) and t <= (x + y) * (1 + 1e-9)
    # A is DDP over 2 ranks (gradients all-reduced); B is tensor parallel (sampled TP traffic, no dp gradients)
    assert a["bytes_per_step"].get("gradients", 0) > 0 and "gradients" not in b["bytes_per_step"]
    for name, mine in (("a", a), ("b", b)):  # each reads the cache as its own run does
        alone = runs[name][0]["measured"]["bytes_per_step"]
        assert mine["bytes_per_step"]["teacher_outputs_disk"] == pytest.approx(alone["teacher_outputs_disk"])
    assert m["bytes_per_step"]["teacher_outputs_disk"] == pytest.approx(
        a["bytes_per_step"]["teacher_outputs_disk"] + b["bytes_per_step"]["teacher_outputs_disk"])


def test_capability_runs_it_and_refuses_what_it_cannot(tmp_path):
    plan = sequential_plan(tmp_path)
    assert students_one_after_another(plan) and unsupported(plan) == []  # B's tp = 2 is its own
    in_turn = plan.model_copy(update={"prediction": plan.prediction.model_copy(update={"job": None})})
    assert not students_one_after_another(in_turn)
    assert [u.field for u in unsupported(in_turn)] == ["extra_students[0].layout.tp"]  # one mesh in turn
    e = plan.extra_students[0]
    for change, field in (
            (lambda p: p.model_copy(update={"kd": p.kd.model_copy(update={"mode": "online"})}), "kd.mode"),
            (lambda p: p.model_copy(update={"extra_students": [e.model_copy(update={"layout": layout(
                dp=1, mb=1, ranks=[0], layers=2)})]}), "extra_students[0].layout.ranks"),
            (lambda p: p.model_copy(update={"extra_students": [e.model_copy(update={
                "model": STUDENT_B.model_copy(update={"vocab_size": 512})})]}), "extra_students[0].model.vocab_size")):
        found = unsupported(change(plan))
        assert found and found[0].feature == "students_one_after_another" and found[0].field == field, found
    # what still needs a run per student stays refused
    assert job_students_unsupported("offline", "one_after_another", 2) is None
    for strategy, arrangement in (("offline", "side_by_side"), ("separate_online", "one_after_another"),
                                  ("disaggregated_fanout", "side_by_side")):
        assert job_students_unsupported(strategy, arrangement, 2, teacher_gpus=1).feature == "job_students"
    side = plan.model_copy(update={"prediction": plan.prediction.model_copy(update={
        "job": plan.prediction.job.model_copy(update={"students_arrangement": "side_by_side"})})})
    assert not students_one_after_another(side) and unsupported(side)


def test_a_stopped_run_resumes_each_student_from_its_own_checkpoint(runs, tmp_path):
    """Stopped after 2 of 4 steps (a checkpoint at step 2 for each student: B's under
    extra_students0), then resumed to step 4: each student continues from its own checkpoint and
    steps 2-3 give the uninterrupted run's losses (1e-6 of the total, as above); the resumed run
    re-checks the cache and finds every sample (nothing written twice); fault injection, which
    restarts only one student's span, is refused in one line."""
    plan = write_plan(tmp_path / "seq.json", sequential_plan(tmp_path))
    common = ("--checkpoint-every", 2, "--output-dir", tmp_path / "out")
    r = launch(plan, 2, "--steps", 2, *common, "--report", tmp_path / "first.json")
    assert r.returncode == 0, r.stderr[-4000:]
    assert list((tmp_path / "out").glob("plan/checkpoints/*/extra_students0/step_00000002"))
    r = launch(plan, 2, "--steps", STEPS, "--resume", *common, "--report", tmp_path / "resumed.json")
    assert r.returncode == 0, r.stderr[-4000:]
    assert re.findall(r"(\d+) samples written, (\d+) found cached", r.stderr) == [("0", str(ROWS))]
    got = read_report(tmp_path / "resumed.json")["measured"]
    assert got["cache_write_bytes"] == 0
    whole = runs["seq"][0]["measured"]
    for mine, ref in zip(got["students"], whole["students"]):
        assert [p["step"] for p in mine["loss"]] == [2, 3]
        assert all(abs(g - w) <= 1e-6 * abs(ws[0]) for gs, ws in zip(terms(mine["loss"]), terms(ref["loss"])[2:])
                   for g, w in zip(gs, ws))
    r = launch(plan, 2, "--steps", STEPS, "--inject-kill", "1:1", "--output-dir", tmp_path / "kill")
    assert r.returncode != 0 and "not run for students one after another" in r.stderr, r.stderr[-2000:]
