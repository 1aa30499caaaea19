"""--fix teacher.gpu / student.gpu: a role runs only on the GPUs of the pinned type (or group).

On a mixed cluster the pin decides the role's group; the plan's stages record the GPU type of
each stage, so the tests read where each role runs from the plan itself. A pin only removes
arrangements, so a pinned optimum is never better than the unpinned one; bad values exit 2."""

import pytest

from kdplan import whatif as w
from kdplan.errors import Infeasible, InputError
from kdplan.jobs import JobSpec, resolve
from kdplan.planner import Planner
from kdplan.search.bruteforce import brute_force

# Small enough to brute-force: 8 A100 + 8 H100, a 6.7B teacher, a 1.3B student.
MIXED = dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="mixed-a100-h100", gpus=16, seq_len=1024,
             global_batch=32, kd={"allowed_compressions": ["topk:64:8"]})


def _gpus(role_plan) -> set[str]:
    return {s.gpu for s in role_plan.layout.stages}


PLANNER = Planner()  # one planner: problems that differ only in pins share layouts and prices


def _optimum(spec, pins):
    try:
        return PLANNER.search(resolve(JobSpec(**spec), pins=pins))[2].optimum
    except Infeasible:
        return float("inf")


@pytest.mark.parametrize("pins, teacher_gpu, student_gpu, placement", [
    (["teacher.gpu=a100-80g"], {"a100-80g"}, {"h100-80g"}, "disaggregated"),
    (["teacher.gpu=a100-80g", "kd.placement=disaggregated"], {"a100-80g"}, {"h100-80g"}, "disaggregated"),
    (["teacher.gpu=h100-80g", "student.gpu=a100-80g"], {"h100-80g"}, {"a100-80g"}, "disaggregated"),
    (["student.gpu=group1", "teacher.gpu=group1"], {"h100-80g"}, {"h100-80g"}, "colocated"),
    (["student.gpu=a100-80g", "kd.placement=colocated"], {"a100-80g"}, {"a100-80g"}, "colocated"),
])
def test_pinned_role_runs_on_its_group(pins, teacher_gpu, student_gpu, placement):
    plan = Planner().plan(resolve(JobSpec(**MIXED), pins=pins), top_k=0)
    assert _gpus(plan.teacher) == teacher_gpu and _gpus(plan.student) == student_gpu
    assert plan.kd.placement == placement
    t, s = plan.teacher.layout.ranks, plan.student.layout.ranks
    if placement == "disaggregated":
        assert not set(t) & set(s) and plan.world_size == 16
        # ranks follow the cluster's order: the A100 group holds ranks 0-7
        a100 = t if teacher_gpu == {"a100-80g"} else s
        assert sorted(a100) == list(range(8))
    else:
        assert t == s and plan.world_size == 8


def test_pinning_a_gpu_never_beats_the_unpinned_optimum():
    free = _optimum(MIXED, [])
    pinned = {pin: _optimum(MIXED, pin.split()) for pin in [
        "teacher.gpu=a100-80g", "teacher.gpu=h100-80g", "student.gpu=a100-80g", "student.gpu=h100-80g",
        "teacher.gpu=a100-80g student.gpu=h100-80g", "teacher.gpu=h100-80g student.gpu=h100-80g"]}
    assert all(v >= free - 1e-12 for v in pinned.values()), (free, pinned)
    assert min(pinned.values()) == pytest.approx(free)  # some group choice is the free optimum
    assert len({round(v, 9) for v in pinned.values()}) > 1  # and the pins do change the answer


def test_ilp_equals_brute_force_with_a_gpu_pin():
    p = resolve(JobSpec(**MIXED), pins=["teacher.gpu=a100-80g", "student.zero=1", "student.recompute=none"])
    best, cand, tried = brute_force(p)
    assert cand is not None and cand.teacher_group == 0 and cand.student_group == 1
    assert Planner().search(p)[2].optimum == pytest.approx(best, rel=1e-9)


def test_homogeneous_cluster_accepts_its_own_type_only():
    spec = dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=8, seq_len=1024,
                global_batch=32, kd={"allowed_compressions": ["topk:64:8"]})
    assert _optimum(spec, ["teacher.gpu=a100-80g", "student.gpu=group0"]) == pytest.approx(_optimum(spec, []))
    with pytest.raises(InputError, match=r"^--fix teacher.gpu=h100-80g: cluster dgx-a100-80g has no h100-80g GPUs; "
                                         r"its GPU types: a100-80g$"):
        resolve(JobSpec(**spec), pins=["teacher.gpu=h100-80g"])


@pytest.mark.parametrize("pins, match", [
    (["teacher.gpu=b200"], r"--fix teacher.gpu=b200: unknown GPU type; known types: a100-40g, a100-80g.*h200.*; "
                           r"cluster mixed-a100-h100 has a100-80g, h100-80g"),
    (["student.gpu=h200"], r"cluster mixed-a100-h100 has no h200 GPUs; its GPU types: a100-80g, h100-80g"),
    (["student.gpu=group2"], r"student.gpu=group2: unknown GPU type"),
    (["student.gpu=../x"], r"expected a GPU type"),
    (["teacher.gpu=a100-80g", "student.gpu=h100-80g", "kd.placement=colocated"], r"differ, but kd.placement=colocated"),
])
def test_bad_gpu_pins_are_input_errors(pins, match):
    with pytest.raises(InputError, match=match):
        resolve(JobSpec(**MIXED), pins=pins)


def test_same_group_disaggregated_on_a_mixed_cluster_is_infeasible_with_a_reason():
    with pytest.raises(Infeasible, match="disaggregated roles use two different groups"):
        Planner().plan(resolve(JobSpec(**MIXED), pins=["teacher.gpu=a100-80g", "student.gpu=a100-80g",
                                                        "kd.placement=disaggregated"]))


def test_cli_and_job_file(kdplan_cli, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('teacher = "gpt-6.7b"\nstudent = "gpt-1.3b"\ncluster = "mixed-a100-h100"\ngpus = 16\n'
                   'seq_len = 1024\nglobal_batch = 32\n[kd]\nallowed_compressions = ["topk:64:8"]\n'
                   '[fix]\n"teacher.gpu" = "a100-80g"\n')
    r = kdplan_cli("plan", job, "-o", tmp_path / "plan.json", "--top", "0")
    assert r.returncode == 0, r.stderr
    from kdplan.schema import Plan
    plan = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    assert _gpus(plan.teacher) == {"a100-80g"} and _gpus(plan.student) == {"h100-80g"}
    r = kdplan_cli("plan", job, "--fix", "teacher.gpu=h9000", "-o", tmp_path / "p2.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown GPU type" in r.stderr, r.stderr
    job.write_text(job.read_text().replace('"a100-80g"', '"v100"'))
    r = kdplan_cli("plan", job, "-o", tmp_path / "p3.json")
    assert r.returncode == 2 and "field 'fix'" in r.stderr and "teacher.gpu=v100" in r.stderr, r.stderr
    r = kdplan_cli("plan", "--cluster", "dgx-h100", "--gpus", "8", "--fix", "student.gpu=a100-80g")
    assert r.returncode == 2 and "has no a100-80g GPUs" in r.stderr, r.stderr


def test_whatif_sweeps_and_holds_gpu_pins():
    base = w.Base(spec=JobSpec(**MIXED))
    res = w.run_sweep(base, w.parse_sweep(["teacher.gpu=auto,a100-80g,h100-80g,group1"]))
    gpus = [(r["teacher.gpu"], r["plan.teacher.gpu"], r["plan.student.gpu"]) for r in res.rows]
    assert gpus[1] == ("a100-80g", "a100-80g", "h100-80g")
    assert gpus[2][1] == "h100-80g" and gpus[3][1] == "h100-80g"
    assert all(r["step_time_s"] >= res.rows[0]["step_time_s"] - 1e-12 for r in res.rows)
    # a pin held constant while the cluster changes: points without that GPU type are rows with a reason
    base = w.Base(spec=JobSpec(**MIXED), pins=["teacher.gpu=a100-80g"])
    res = w.run_sweep(base, w.parse_sweep(["cluster=mixed-a100-h100@16,dgx-a100-80g@8,dgx-h100@8"]))
    assert [r["feasible"] for r in res.rows] == [True, True, False]
    assert "has no a100-80g GPUs" in res.rows[2]["reason"] and res.rows[2]["reason"].startswith("invalid point")
    with pytest.raises(InputError, match="--sweep student.gpu=a/b"):
        w.parse_sweep(["student.gpu=a/b"])


def test_teacher_may_leave_nodes_of_its_group_idle():
    """GPT-13B (40 heads, 40 layers) has no layout on 24 GPUs with dp dividing the batch; pinned to
    the 24 A100 of a 24 A100 + 16 H100 cluster it runs on whole nodes of them, the rest idle."""
    from pathlib import Path

    from kdplan.search.candidates import role_options
    cluster = str(Path(__file__).resolve().parent.parent / "examples" / "whatif" / "mixed-24a100-16h100.yaml")
    p = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster=cluster, seq_len=1024, global_batch=64),
                pins=["teacher.gpu=a100-80g"])
    assert not role_options(p.teacher, "teacher", 24, gpus_per_node=8, global_batch=64, memory_gib=80, pins={})
    plan = Planner().plan(p, top_k=0)
    t, s = plan.teacher.layout, plan.student.layout
    assert _gpus(plan.teacher) == {"a100-80g"} and _gpus(plan.student) == {"h100-80g"}
    assert t.num_gpus in (8, 16) and s.num_gpus == 16 and plan.world_size == t.num_gpus + 16
    assert t.ranks == list(range(t.num_gpus)) and s.ranks == list(range(t.num_gpus, t.num_gpus + 16))


@pytest.mark.parametrize("gpu", ["h100-80g", "a100-80g"])  # the slower type too: it is not the free choice
def test_plain_training_takes_a_student_pin(gpu):
    spec = dict(MIXED, teacher=None)
    plan = Planner().plan(resolve(JobSpec(**spec), pins=[f"student.gpu={gpu}"]), top_k=0)
    assert _gpus(plan.student) == {gpu} and plan.world_size == 8
    with pytest.raises(InputError, match="there is no teacher"):
        resolve(JobSpec(**spec), pins=["teacher.gpu=h100-80g"])


@pytest.mark.slow  # 15-45 s: out of the planner's fast tier
def test_infeasible_under_a_gpu_pin_names_the_pin_not_a_bigger_cluster():
    # a 70B teacher unsharded on one A100 cannot fit: growing the cluster would not help, the pins must go
    spec = dict(MIXED, teacher="llama-3-70b", student="llama-3-8b", kd={})
    with pytest.raises(Infeasible) as e:
        Planner().plan(resolve(JobSpec(**spec), pins=["teacher.gpu=a100-80g", "teacher.tp=1", "teacher.pp=1",
                                                       "teacher.zero=0", "teacher.offload=none"]))
    msg = str(e.value)
    assert "no layout fits on the GPUs the pin allows; unpin teacher.gpu, teacher.zero, teacher.offload" in msg, msg
    assert "no cluster of up to" not in msg
