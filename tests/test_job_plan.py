"""Whole-job planning (issue 16, planner side): several students, epochs, a teacher cache.

The done-when checks of the issue on the seed cluster, storage that is too small, the prices
of kdplan.cost.job, and the job inputs (--student repeated, students = [...], --dataset-tokens).
Planner only: no torch.
"""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_kdplan
from kdplan.cost import job as jc
from kdplan.jobs import resolve
from kdplan.planner import make_plan
from kdplan.schema import JobSpec
from kdplan.schema.compression import parse_compression


def _plan(**kw):
    fix = kw.pop("fix", None)
    spec = JobSpec(teacher="gpt-13b", cluster="dgx-a100-80g", gpus=32, **kw)
    return make_plan(resolve(spec, pins=fix), top_k=0)


def test_two_students_runnable_run_one_after_another_offline():
    """--runnable with gpt-1.3b and gpt-2.7b from gpt-13b on 32 A100-80GB: in turn (117 GiB per GPU)
    and online fan-out (159 GiB) do not fit, so before students one after another ran in one
    `kdplan run` no strategy was left; now offline one after another is (the same job as without
    --runnable, >= 1.4x separate mirror), carrying gpt-2.7b's own step plan, and the executor runs it."""
    plan = _plan(students=["gpt-1.3b", "gpt-2.7b"], tokens=1e10, solver={"runnable": True})
    job = plan.prediction.job
    assert (job.strategy, job.students_arrangement) == ("offline", "one_after_another")
    assert job.speedup_vs_separate_mirror >= 1.4
    assert plan.executor.runnable, plan.executor.unsupported
    (extra,) = plan.extra_students
    assert extra.source == "gpt-2.7b" and extra.layout.num_gpus == 32 and plan.kd.mode == "offline"
    assert any("offline in turn" in r and "GiB" in r for r in job.rejected)


def test_two_students_beat_separate_mirror_jobs_by_1_4x_cli():
    r = run_kdplan("plan", "--teacher", "gpt-13b", "--student", "gpt-1.3b", "--student", "gpt-2.7b",
                   "--cluster", "dgx-a100-80g", "--gpus", "32", "--tokens", "1e10", "--json", "-o", "")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    job = plan["prediction"]["job"]
    assert [s["student"] for s in job["students"]] == ["gpt-1.3b", "gpt-2.7b"]
    assert all(s["step_time_s"] > 0 and s["mirror_step_time_s"] > s["step_time_s"] for s in job["students"])
    # offline one after another: the plan carries gpt-2.7b's own step plan and `kdplan run` executes it
    # (capability.students_one_after_another: one teacher pass, then each student all its steps)
    assert (job["strategy"], job["students_arrangement"]) == ("offline", "one_after_another")
    assert [e["source"] for e in plan["extra_students"]] == ["gpt-2.7b"] and plan["executor"]["runnable"]
    assert all(s["gpus"] == 32 for s in job["students"])  # one after another beats side by side here
    assert "side by side on 16+16 GPUs" in job["reason"]  # the side-by-side split was priced
    # and so were 8+24 and 24+8: the teacher pass is the job's, on all 32 GPUs, not planned on each
    # student's group (gpt-13b has no layout on 24 GPUs, which rejected those splits before)
    assert "side by side on 8+24 GPUs" in job["reason"] and "side by side on 24+8 GPUs" in job["reason"]
    assert job["speedup_vs_separate_mirror"] >= 1.4
    base = job["baselines"]["separate_mirror"]["total_time_s"]
    assert job["speedup_vs_separate_mirror"] == pytest.approx(base / job["total_time_s"], rel=1e-12)
    # the baseline is each student's own mirror step over its steps, teacher recomputed
    assert base == pytest.approx(sum(s["mirror_step_time_s"] * s["steps"] for s in job["students"]), rel=1e-9)
    # the timeline covers the whole job without gaps or overlaps (one after another here)
    t = job["timeline"]
    assert t[0]["start_s"] == 0.0
    for a, b in zip(t, t[1:]):
        assert b["start_s"] == pytest.approx(a["start_s"] + a["duration_s"], rel=1e-12)
    assert t[-1]["start_s"] + t[-1]["duration_s"] == pytest.approx(job["total_time_s"], rel=1e-12)


def test_three_epochs_run_the_teacher_once_from_a_cache_that_fits():
    plan = _plan(student="gpt-1.3b", tokens=3e10, dataset_tokens=1e10)
    job = plan.prediction.job
    assert job.strategy == "offline" and job.teacher_passes == 1 and job.epochs == 3
    assert job.speedup_vs_separate_mirror >= 1.5
    tier = {t.name: t for t in jc.storage_tiers(resolve(JobSpec(cluster="dgx-a100-80g", gpus=32)).cluster)}
    assert 0 < job.cache_bytes <= tier[job.cache_storage].capacity_bytes
    fmt = job.cache_format
    assert job.cache_bytes == pytest.approx(1e10 * fmt.bytes_per_token(plan.student.model.vocab_size, 2))
    # the step plan runs what the job chose (issue 16 item 3): offline, reading the job's cache
    # format, the step the job priced; the dataset goes to the executor in job.dataset_tokens
    assert plan.kd.mode == "offline" and str(plan.kd.compression) == str(job.cache_format)
    assert plan.prediction.step_time_s == pytest.approx(job.students[0].step_time_s, rel=1e-12)
    assert plan.prediction.offline is not None and "prediction.job" in plan.kd.compression_reason
    assert plan.job.tokens == 3e10 and plan.job.dataset_tokens == 1e10
    # the single-step plan of the same job without a token budget stays online
    assert _plan(student="gpt-1.3b").kd.mode == "online"


def test_storage_too_small_says_what_binds_and_falls_back_to_online(tmp_path):
    d = yaml.safe_load((ROOT / "profiles" / "clusters" / "dgx-a100-80g.yaml").read_text())
    d["name"] = "small-storage"
    d["groups"][0]["node"]["local_storage"]["capacity_tb"] = 0.01
    d["shared_storage"]["capacity_tb"] = 0.1
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(d))
    spec = JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster=str(path), gpus=32, tokens=3e10, dataset_tokens=1e10)
    plan = make_plan(resolve(spec), top_k=0)
    job = plan.prediction.job
    assert job.strategy != "offline" and job.cache_bytes == 0 and job.teacher_passes == 3
    assert plan.kd.mode == "online"  # no cache to read: the step plan stays online
    msgs = " | ".join(job.rejected)
    assert "needs" in msgs and "the shared parallel file system holds 0.1 TB" in msgs, msgs


def test_pinned_online_never_plans_a_cache():
    plan = _plan(student="gpt-1.3b", tokens=3e10, dataset_tokens=1e10, fix=["kd.mode=online"])
    job = plan.prediction.job
    assert job.strategy != "offline" and job.teacher_passes == 3 and plan.kd.mode == "online"


def test_no_token_budget_no_job_prediction():
    assert _plan(student="gpt-1.3b").prediction.job is None


def test_offline_price_adds_pass_and_reads_and_the_write_can_bind():
    fmt = parse_compression("topk:64")
    slow = jc.Storage("slow", 1e15, 1e9, 1e6, 1.0)  # 1 MB/s of writes
    p = jc.offline(["a", "b"], 2.0, [1.0, 3.0], 1e6, 20, 1e5, fmt, 100.0, slow, 8)
    # 10 pass steps; each writes 1e7 bytes at 1e6 B/s = 10 s > the 2 s forward: the write binds
    assert p.phases[0].duration_s == pytest.approx(100.0)
    assert p.total_time_s == pytest.approx(100.0 + 20 * 1.0 + 20 * 3.0)
    assert p.cache_bytes == pytest.approx(1e8) and p.teacher_passes == 1.0
    fast = jc.Storage("fast", 1e15, 1e12, 1e12, 1.0)
    assert jc.offline(["a"], 2.0, [1.0], 1e6, 20, 1e5, fmt, 100.0, fast, 8).total_time_s == pytest.approx(20 + 20)


def test_offline_side_by_side_lasts_until_the_slowest_student():
    fmt = parse_compression("topk:64")
    fast = jc.Storage("fast", 1e15, 1e12, 1e12, 1.0)
    p = jc.offline(["a", "b"], 2.0, [1.0, 3.0], 1e6, 20, 1e5, fmt, 100.0, fast, 8, student_gpus=[4, 4])
    assert p.total_time_s == pytest.approx(10 * 2.0 + 20 * 3.0)
    assert [(ph.gpus, start) for ph, start in p.timeline()] == [(8, 0.0), (4, 20.0), (4, 20.0)]


def test_side_by_side_phases_take_the_longer_one():
    p = jc.JobPrice("x", [jc.Phase("pass", 5, 8), jc.Phase("a", 3, 4), jc.Phase("b", 7, 4, parallel_with_previous=True)])
    assert p.total_time_s == 12
    assert [s for _, s in p.timeline()] == [0, 5, 5]


def test_fits_names_the_format_the_size_and_the_tier():
    s = jc.Storage("shared file system", 100e12, 1, 1, 1)
    fmt = parse_compression("topk:64")
    assert jc.fits(s, 50e12, fmt, 1e11) is None
    assert jc.fits(s, 320e12, fmt, 1e12) == ("the topk:64 cache of 1e+12 tokens needs 320 TB; the shared "
                                             "file system holds 100 TB")


def test_job_file_students_and_conflicts(tmp_path):
    p = resolve(JobSpec.model_validate({"teacher": "gpt-13b", "students": ["gpt-1.3b", "gpt-2.7b"]}))
    assert p.student.name == p.students[0].name and len(p.students) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('student = "gpt-2.7b"\nstudents = ["gpt-1.3b", "gpt-2.7b"]\n')
    r = run_kdplan("plan", bad, "--json", "-o", "")
    assert r.returncode == 2 and "is not the first of students" in r.stderr and "Traceback" not in r.stderr
    r = run_kdplan("plan", "--student", "gpt-1.3b", "--student", "nope-model", "--json", "-o", "")
    assert r.returncode == 2 and "--student" in r.stderr and "Traceback" not in r.stderr


def test_shipped_dgx_clusters_carry_sourced_storage():
    for name in ("dgx-a100-80g", "dgx-a100-40g", "dgx-h100", "dgx-h200"):
        c = resolve(JobSpec(cluster=name)).cluster
        local, shared = c.groups[0].node.local_storage, c.shared_storage
        assert local is not None and "datasheet" in local.source and local.capacity_tb in (15, 30)
        assert shared is not None and shared.source.startswith("assumption")
        assert Path(ROOT / "profiles" / "clusters" / f"{name}.yaml").exists()


def test_whatif_sweeps_storage_capacity_and_students():
    r = run_kdplan("whatif", "--teacher", "gpt-13b", "--student", "gpt-1.3b", "--cluster", "dgx-a100-80g",
                   "--gpus", "32", "--tokens", "3e10", "--dataset-tokens", "1e10",
                   "--sweep", "storage_capacity_scale=1,1e-6", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["whole_job.strategy"] == "offline" for x in rows] == [True, False]
    assert [x["whole_job.teacher_passes"] for x in rows] == [1.0, 3.0]
    from kdplan import whatif as w
    base = w.Base(spec=JobSpec(teacher="gpt-13b", students=["gpt-1.3b", "gpt-2.7b"], tokens=1e10))
    (ax,) = w.parse_sweep(["students=gpt-2.7b+gpt-1.3b"])
    p = w.point_problem(base, {"students": (ax.values[0], ax.labels[0])})
    assert [s.name for s in p.students] == [p.student.name, resolve(JobSpec(student="gpt-1.3b")).student.name]
    assert p.job.students == ["gpt-2.7b", "gpt-1.3b"]
    (ax,) = w.parse_sweep(["storage_bw_scale=0.5"])
    c = w.point_problem(base, {"storage_bw_scale": (ax.values[0], ax.labels[0])}).cluster
    assert c.shared_storage.read_gb_per_s == 40 and c.groups[0].node.local_storage.write_gb_per_s == 6


def test_the_first_students_step_problem_keeps_the_shared_vocabulary():
    """A padded pair whose teacher table is the smaller (151,936 vs 152,064 ids): the whole job's
    step problems distil over the shared ids, not the student's padded table (they used to)."""
    from kdplan.search.job import _sub
    p = resolve(JobSpec(teacher=str(ROOT / "examples/configs/qwen2.5-0.5b/config.json"), student="qwen2.5-7b",
                        cluster="dgx-h100", gpus=8, tokens=1e9))
    assert (p.kd_vocab_size, p.student.vocab_size) == (151936, 152064)
    assert _sub(p, 0).kd_vocab_size == 151936


def test_online_then_cache_price_has_no_teacher_pass_and_hides_the_write_under_the_step():
    fmt = parse_compression("topk:64")
    fast = jc.Storage("fast", 1e15, 1e12, 1e12, 1.0)
    # writer "a": 10 steps online at 6 s (the unique tokens), then 10 steps reading at 1 s; "b" reads 20 x 3 s
    p = jc.online_then_cache(["a", "b"], 0, 6.0, [1.0, 3.0], 1e6, 20, 1e5, fmt, 100.0, fast, 8)
    assert p.total_time_s == pytest.approx(10 * 6.0 + 10 * 1.0 + 20 * 3.0)
    assert [ph.name for ph in p.phases] == ["a epoch 1, teacher online", "a later epochs", "b"]
    assert p.teacher_passes == 1.0 and p.cache_bytes == pytest.approx(1e8) and p.strategy == "online_then_cache"
    assert p.student_steps_s == pytest.approx([(60 + 10) / 20, 3.0])  # the writer's mean step
    # a write slower than the online step binds it (1e7 bytes per step at 1e6 B/s: 10 s > 6 s)
    slow = jc.Storage("slow", 1e15, 1e12, 1e6, 1.0)
    assert jc.online_then_cache(["a"], 0, 6.0, [1.0], 1e6, 20, 1e5, fmt, 100.0, slow, 8).total_time_s == \
        pytest.approx(10 * 10.0 + 10 * 1.0)
    # against offline on the same slow storage: the pass is write-bound too, and every epoch reads
    assert jc.offline(["a"], 2.0, [1.0], 1e6, 20, 1e5, fmt, 100.0, slow, 8).total_time_s == \
        pytest.approx(10 * 10.0 + 20 * 1.0)


def test_offline_in_turn_reads_once_per_step_for_every_student():
    fmt = parse_compression("topk:64")
    fast = jc.Storage("fast", 1e15, 1e12, 1e12, 1.0)
    # two students without the read 1 s and 3 s, compute 0.8 s and 2.5 s; one read of 4 s per step:
    # 4 - 3.3 = 0.7 s exposed once (one after another, each run would read it: 4 - 0.8 and 4 - 2.5)
    p = jc.offline_in_turn(["a", "b"], 2.0, [1.0, 3.0], 4.0, [0.8, 2.5], 1e6, 20, 1e5, fmt, 100.0, fast, 8)
    assert p.total_time_s == pytest.approx(10 * 2.0 + 20 * (1.0 + 3.0 + 0.7))
    assert p.in_turn and p.teacher_passes == 1.0 and len(p.phases) == 2
    hidden = jc.offline_in_turn(["a", "b"], 2.0, [1.0, 3.0], 3.0, [0.8, 2.5], 1e6, 20, 1e5, fmt, 100.0, fast, 8)
    assert hidden.total_time_s == pytest.approx(10 * 2.0 + 20 * 4.0)


def _slow_storage(tmp_path, scale: float) -> str:
    d = yaml.safe_load((ROOT / "profiles" / "clusters" / "dgx-a100-80g.yaml").read_text())
    d["name"] = f"slow-storage-{scale}"
    for t in (d["groups"][0]["node"]["local_storage"], d["shared_storage"]):
        t["read_gb_per_s"] *= scale
        t["write_gb_per_s"] *= scale
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_the_mix_wins_when_storage_is_slow_and_ties_go_to_offline(tmp_path):
    """Three epochs of one student: on the shipped storage the first epoch online writing the cache
    costs what the teacher pass plus a read epoch cost (the tie goes to offline, which the executor
    runs); at 1/50 of the storage bandwidth the pass is write-bound and reads are exposed, and the
    mix (no separate pass, the write hidden under the online step, one epoch fewer reading) wins."""
    spec = dict(teacher="gpt-13b", student="gpt-1.3b", gpus=32, tokens=3e10, dataset_tokens=1e10)
    job = make_plan(resolve(JobSpec(cluster="dgx-a100-80g", **spec)), top_k=0).prediction.job
    assert job.strategy == "offline" and "online_then_cache" in job.reason
    slow = _slow_storage(tmp_path, 0.02)
    plan = make_plan(resolve(JobSpec(cluster=slow, **spec)), top_k=0)
    job = plan.prediction.job
    assert job.strategy == "online_then_cache" and job.teacher_passes == 1 and job.cache_bytes > 0
    offline = make_plan(resolve(JobSpec(cluster=slow, **spec), pins=["kd.mode=offline"]), top_k=0).prediction.job
    assert offline.strategy == "offline" and offline.total_time_s > 1.02 * job.total_time_s
    assert job.timeline[0].name == "gpt-1.3b epoch 1, teacher online" and "writes" in job.timeline[0].detail
    assert "teacher pass" not in [p.name for p in job.timeline]
    assert "gpt-1.3b's first epoch runs the teacher online and writes the cache" in job.arrangement_reason
    # the plan is the first epoch's online step at the cache's format, co-located; the executor runs it
    # (tests/test_exec_online_then_cache.py), so --runnable keeps it
    assert plan.kd.mode == "online" and plan.kd.placement == "colocated"
    assert str(plan.kd.compression) == str(job.cache_format)
    assert plan.executor.runnable, plan.executor.unsupported
    runnable = make_plan(resolve(JobSpec(cluster=slow, solver={"runnable": True}, **spec)),
                         top_k=0).prediction.job
    assert runnable.strategy == "online_then_cache" and not any("online_then_cache" in r for r in runnable.rejected)


def test_a_cache_refused_for_measured_free_space_says_so_and_a_profile_capacity_overrides_it(tmp_path):
    """cpu-local's storage capacity is the free space kdplan profile found under a path on a day
    (0.073 TB): a cache bigger than that is refused for a reason that depends on the day, so the
    refusal says where and when it was measured and how to plan with another capacity; a copy of
    the profile with capacity_tb set (and capacity_measured removed) plans the cache."""
    args = ["plan", "examples/tiny-cpu/job.toml", "--tokens", "3e8", "--dataset-tokens", "1e8",
            "--fix", "kd.mode=offline", "--fix", "kd.compression=dense", "--json"]
    r = run_kdplan(*args)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "what binds: capacity" in r.stderr and "needs 3.277 TB" in r.stderr
    d = yaml.safe_load((ROOT / "profiles" / "clusters" / "cpu-local.yaml").read_text())
    tier = d["groups"][0]["node"]["local_storage"]
    # where and when: the profile's own line (a re-profile changes both)
    assert tier["capacity_measured"].startswith("free space of /") and " UTC" in tier["capacity_measured"]
    assert tier["capacity_measured"] in r.stderr and "capacity_tb" in r.stderr
    tier["capacity_tb"] = 10.0
    del tier["capacity_measured"]
    path = tmp_path / "cpu-local-10tb.yaml"
    path.write_text(yaml.safe_dump(d))
    r = run_kdplan(*args, "--cluster", path)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["prediction"]["job"]
    assert job["strategy"] == "offline" and job["cache_bytes"] == pytest.approx(3.277e12, rel=1e-3)


def test_side_by_side_students_are_planned_without_a_teacher_of_their_own():
    """Students side by side read one cache written by one teacher pass on all the job's GPUs: each
    group's step plan lays out the student only (Problem.teacher_pass_apart). On 24 of 32 A100s
    gpt-13b has no layout, so planning the teacher on the group refused the student; apart, the
    student plans, with no teacher in its plan and no pass charged to it."""
    from kdplan.errors import Infeasible
    from kdplan.planner import Planner
    from kdplan.profiles import scale_cluster
    from kdplan.search import job as js

    problem = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", students=["gpt-1.3b", "gpt-2.7b"],
                              cluster="dgx-a100-80g", gpus=32, tokens=1e10))
    planner = Planner()
    shared = next(t for t in jc.storage_tiers(problem.cluster) if t.name == problem.cluster.shared_storage.name)
    cl = js._with_read(scale_cluster(problem.cluster, 24), shared)
    pins = {"kd.mode": "offline", "kd.compression": parse_compression("topk:1024")}
    with pytest.raises(Infeasible, match="teacher"):
        planner.plan(js._sub(problem, 1, pins, cl), top_k=0)
    plan = planner.plan(js._sub(problem, 1, pins, cl, apart=True), top_k=0)
    assert plan.teacher is None and plan.student.layout.num_gpus == 24 and plan.kd.mode == "offline"
    assert plan.prediction.offline.teacher_pass_s_per_step == 0.0 and plan.prediction.step_time_s > 0
    # on 8 GPUs, where the teacher fits, the student's step is the same either way
    cl8 = js._with_read(scale_cluster(problem.cluster, 8), shared)
    with_teacher = planner.plan(js._sub(problem, 1, pins, cl8), top_k=0)
    apart = planner.plan(js._sub(problem, 1, pins, cl8, apart=True), top_k=0)
    assert apart.prediction.step_time_s == pytest.approx(with_teacher.prediction.step_time_s, rel=1e-12)
    assert with_teacher.prediction.offline.teacher_pass_s_per_step > 0
