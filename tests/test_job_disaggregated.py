"""Whole job (issue 16): the teacher on its own GPUs fanning out online to students side by side
(disaggregated_fanout), how the students share the GPUs (prediction.job.students_arrangement),
and what binds when no whole-job strategy can run. Planner only: no torch.

The prices are checked against hand-computed small cases; the planner checks use the seed
cluster with storage too small for a cache and GPUs too small for the co-located fan-out, where
the teacher's own group wins.
"""

import json

import pytest
import yaml

from conftest import ROOT, run_kdplan
from kdplan.cost import job as jc
from kdplan.errors import Infeasible
from kdplan.search import job as js


def test_fanout_transfer_the_slower_end_binds():
    # 1e5 tokens x 100 B = 1e7 B per copy; lanes of 1e9 B/s.
    # teacher on 8 lanes sends 2 copies: 2e7 / 8e9 = 2.5 ms; student of 8 lanes receives 1e7 / 8e9 = 1.25 ms
    assert jc.fanout_transfer_s(1e5, 100.0, 8, [8, 16], 1e9) == pytest.approx(2.5e-3)
    # a 1-GPU student group receives its copy over one lane: 1e7 / 1e9 = 10 ms > the teacher's 2e7 / 8e9
    assert jc.fanout_transfer_s(1e5, 100.0, 8, [1, 16], 1e9) == pytest.approx(1e-2)
    # the latency of one message is added once
    assert jc.fanout_transfer_s(1e5, 100.0, 8, [8, 16], 1e9, latency_s=1e-3) == pytest.approx(3.5e-3)


def test_disaggregated_fanout_runs_at_the_slowest_part_after_one_fill():
    # teacher forward 2 s, students 1 s and 3 s, transfer 0.5 s; 100 steps:
    # step = max(2, 0.5, 1, 3) = 3 s; fill = 2 + 0.5 = 2.5 s; job = 2.5 + 300 = 302.5 s
    p = jc.disaggregated_fanout(["a", "b"], 8, 2.0, [1.0, 3.0], [8, 16], 0.5, 100, 2.0, "ib")
    assert p.total_time_s == pytest.approx(302.5)
    assert p.teacher_passes == 2.0 and p.teacher_gpus == 8 and p.student_gpus == [8, 16]
    assert [(ph.name, ph.gpus, start, ph.duration_s) for ph, start in p.timeline()] == [
        ("teacher (own GPUs, online)", 8, 0.0, pytest.approx(302.5)), ("a", 8, 2.5, 300.0), ("b", 16, 2.5, 300.0)]
    assert "b's step binds" in p.phases[0].detail
    # the transfer binds when it is the slowest: step 5 s, fill 7 s
    q = jc.disaggregated_fanout(["a", "b"], 8, 2.0, [1.0, 3.0], [8, 16], 5.0, 100, 1.0)
    assert q.total_time_s == pytest.approx(7.0 + 500.0) and "the outputs' transfer binds" in q.phases[0].detail
    # and the teacher when it is
    r = jc.disaggregated_fanout(["a", "b"], 8, 4.0, [1.0, 3.0], [8, 16], 0.5, 10, 1.0)
    assert r.total_time_s == pytest.approx(4.5 + 40.0) and "the teacher's forward binds" in r.phases[0].detail


def test_parts_every_cut_or_one_proportional_split():
    assert js._parts(4, None, 3) == [[1, 1, 2], [1, 2, 1], [2, 1, 1]]
    assert js._parts(2, None, 3) == []
    # 8 GPUs in 3 parts: 21 cuts > MAX_SPLITS, so the one proportional to the work (4 : 1 : 3)
    assert js._parts(8, [4.0, 1.0, 3.0], 3) == [[4, 1, 3]]
    # hundreds of nodes and several students: counted, not enumerated (C(511, 5) is 2.8e11 cuts)
    assert js._parts(512, None, 6) == [[87, 85, 85, 85, 85, 85]]


def test_arrangement_says_which_and_why():
    # one after another: 10 + 15 + 15 = 40 s; side by side: fill 1 s + 30 steps of 1 s = 31 s
    seq = jc.JobPrice("offline", [jc.Phase("pass", 10, 8), jc.Phase("a", 15, 8), jc.Phase("b", 15, 8)])
    side = jc.disaggregated_fanout(["a", "b"], 4, 1.0, [1.0, 1.0], [2, 2], 0.0, 30, 1.0)
    arr, why = js._arrangement(side, [seq, side], 2, 8)
    assert arr == "side_by_side" and side.total_time_s < seq.total_time_s
    assert why.startswith("side by side on 2+2 GPUs: 0.008611 h, the shortest") and "one after another at best 0.01111 h" in why
    assert "in turn within each step on the same GPUs: none could run" in why
    arr, why = js._arrangement(seq, [seq], 1, 8)
    assert arr == "one_after_another" and "one student" in why


def _small_storage(tmp_path, local_tb=0.01, shared_tb=0.1):
    d = yaml.safe_load((ROOT / "profiles" / "clusters" / "dgx-a100-80g.yaml").read_text())
    d["name"] = "small-storage"
    d["groups"][0]["node"]["local_storage"]["capacity_tb"] = local_tb
    d["shared_storage"]["capacity_tb"] = shared_tb
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def no_cache_two_students(tmp_path_factory):
    """The issue's two students (gpt-13b -> gpt-1.3b and gpt-2.7b on 32 A100 80 GB, 1e10 tokens)
    with storage too small for any cache: the co-located fan-out does not fit 80 GB, so the job
    is the teacher on its own GPUs fanning out, or each student on its own."""
    from kdplan.jobs import resolve
    from kdplan.planner import make_plan
    from kdplan.schema import JobSpec
    path = _small_storage(tmp_path_factory.mktemp("storage"))
    spec = JobSpec(teacher="gpt-13b", students=["gpt-1.3b", "gpt-2.7b"], cluster=str(path), gpus=32, tokens=1e10)
    return make_plan(resolve(spec), top_k=0)


def test_the_teacher_on_its_own_gpus_wins_without_a_cache(no_cache_two_students):
    job = no_cache_two_students.prediction.job
    # the old planner had no such strategy: separate_online (35.4 h on main) won here
    assert job.strategy == "disaggregated_fanout", job.reason
    assert job.students_arrangement == "side_by_side" and job.teacher_gpus is not None
    gs = [s.gpus for s in job.students]
    assert job.teacher_gpus + sum(gs) == 32 and all(g % 8 == 0 for g in [job.teacher_gpus, *gs])  # whole nodes
    assert job.teacher_passes == 1.0 and job.cache_bytes == 0  # one epoch, nothing stored
    # the timeline: the teacher from 0 to the end, the students side by side after its first batch
    t = job.timeline
    assert t[0].start_s == 0 and t[0].gpus == job.teacher_gpus
    assert t[0].duration_s == pytest.approx(job.total_time_s, rel=1e-12)
    assert [p.gpus for p in t[1:]] == gs and t[1].start_s == t[2].start_s > 0
    assert t[1].start_s + t[1].duration_s == pytest.approx(job.total_time_s, rel=1e-12)
    # every student runs at the job's step, at least its own
    step = t[1].duration_s / job.students[0].steps
    assert all(s.step_time_s <= step * (1 + 1e-12) for s in job.students)
    # it beats every student on its own (separate_online is still priced, and lost)
    assert "separate_online" in job.reason and job.speedup_vs_separate_mirror > 1.0
    assert job.arrangement_reason.startswith("side by side on ") and "one after another at best" in job.arrangement_reason
    assert any("needs" in r and "holds 0.1 TB" in r for r in job.rejected)  # why no cache


def test_a_job_no_strategy_can_run_says_what_binds(tmp_path):
    path = _small_storage(tmp_path)
    r = run_kdplan("plan", "--teacher", "gpt-13b", "--student", "gpt-1.3b", "--cluster", path, "--gpus", "32",
                   "--tokens", "3e10", "--dataset-tokens", "1e10", "--fix", "kd.mode=offline", "--json", "-o", "")
    assert r.returncode == 3, r.stderr
    assert "what binds: capacity" in r.stderr and "holds 0.1 TB" in r.stderr and "Traceback" not in r.stderr
