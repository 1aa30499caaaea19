"""make_plan end to end: a regression of the seed plan's prediction, schema, rank map, infeasibility messages, the CLI."""

import json
from pathlib import Path

import pytest

from kdplan.errors import Infeasible
from kdplan.jobs import JobSpec, load_job, resolve
from kdplan.planner import make_plan

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed" / "job.toml"
GOLDEN = ROOT / "tests" / "golden" / "plan_schema.json"


@pytest.fixture(scope="module")
def seed_plan():
    return make_plan(resolve(load_job(str(SEED)), job_path=str(SEED)))


def test_seed_plan_prediction_regression(seed_plan):
    """A REGRESSION of the planner's output on the seed job (issue 4 item 9: GPT-13B -> GPT-1.3B on
    32 A100-80GB), not an achieved speedup: every number below is the cost model's prediction
    for the chosen plan divided by the same cost model's prediction for a baseline layout. It
    fails when a change to the planner or the cost model moves the chosen plan's prediction
    below these floors. Measured speedups come from `kdplan run --baseline` (executor reports,
    benchmarks/executor_speedup.py) and measured accuracy from `kdplan validate`."""
    pr = seed_plan.prediction
    # the ratios are of predictions: the chosen plan's over the baselines priced in the same plan
    b = pr.baselines
    assert pr.speedup_vs_single_gpu == pytest.approx(b.single_gpu.step_time_s / pr.step_time_s, rel=1e-9)
    assert pr.speedup_vs_mirror == pytest.approx(b.mirror.step_time_s / pr.step_time_s, rel=1e-9)
    assert pr.comm_reduction_vs_naive_dp == pytest.approx(
        1 - pr.comm_bytes_per_step / b.naive_dp.comm_bytes_per_step, rel=1e-9)
    # the floors the predicted plan must keep
    assert pr.speedup_vs_single_gpu >= 25
    # 0.25 since 8-bit gradients are no longer offered under ZeRO >= 1 (the executor cannot run
    # them there); it was >= 0.5 with ZeRO-2 + int8 gradients
    assert pr.comm_reduction_vs_naive_dp >= 0.2
    assert pr.mfu >= 0.5
    assert seed_plan.solver.status == "optimal" and seed_plan.solver.name == "highs"
    assert pr.speedup_vs_mirror >= 1.0  # never predicted worse than mirror KD
    assert pr.memory_per_gpu_gib <= pr.memory.limit_gib
    # why this teacher-output format (the most faithful within 1% of the fastest plan)
    assert seed_plan.kd.compression_reason.startswith(f"{seed_plan.kd.compression}: ")


def _check(value, schema, defs, path="plan"):
    """A small JSON-Schema walk (objects, $ref, anyOf, arrays, required, no extra keys)."""
    if "$ref" in schema:
        return _check(value, defs[schema["$ref"].split("/")[-1]], defs, path)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return _check(value, sub, defs, path)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: matches no alternative: {errors}")
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        assert isinstance(value, dict), path
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing keys"
        assert set(value) <= set(schema["properties"]), f"{path}: unknown keys {set(value) - set(schema['properties'])}"
        for k, v in value.items():
            _check(v, schema["properties"][k], defs, f"{path}.{k}")
    elif kind == "array":
        assert isinstance(value, list), path
        for i, v in enumerate(value):
            _check(v, schema.get("items", {}), defs, f"{path}[{i}]")
    elif kind == "null":
        assert value is None, path
    elif kind in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
    elif kind == "string":
        assert isinstance(value, str), path
        assert "enum" not in schema or value in schema["enum"], path
    elif kind == "boolean":
        assert isinstance(value, bool), path


def test_plan_json_validates_against_golden_schema(seed_plan):
    schema = json.loads(GOLDEN.read_text())["schema"]
    _check(json.loads(seed_plan.model_dump_json()), schema, schema.get("$defs", {}))


def test_rank_map_and_stages(seed_plan):
    for role in (seed_plan.teacher, seed_plan.student):
        lo = role.layout
        assert sorted(lo.ranks) == list(range(seed_plan.world_size)) or len(lo.ranks) == lo.num_gpus
        assert len(lo.stages) == lo.pp * lo.virtual_stages
        assert lo.stages[0].first_layer == 0 and lo.stages[-1].last_layer == role.model.num_layers
        assert all(a.last_layer == b.first_layer for a, b in zip(lo.stages, lo.stages[1:]))
        assert sorted(r for s in lo.stages[:lo.pp] for r in s.ranks) == lo.ranks


def test_disaggregated_ranks_do_not_overlap():
    p = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=16, global_batch=64),
                pins=["kd.placement=disaggregated"])
    plan = make_plan(p, top_k=0)
    t, s = plan.teacher.layout, plan.student.layout
    assert not set(t.ranks) & set(s.ranks)
    assert sorted(t.ranks + s.ranks) == list(range(plan.world_size)) and plan.world_size == 16
    assert t.ranks[0] == 0  # teacher first, then student


def test_mixed_cluster_gives_faster_gpus_more_layers():
    # GPT-2.7B (32 layers, 50k vocabulary): the layers dominate the stage times. (A 16-layer
    # student with a 128k vocabulary, llama-3.2-1b, now keeps the even split: the loss over the
    # vocabulary on the H100 last stage outweighs the layers the balancer would move there.)
    # Micro-batch 16 pinned: with the H100 curve fitted on H100 runs (issue 13), a tp=8 block at
    # micro-batch 4 is too small for the H100 to beat the A100 by much, and the even split wins.
    p = resolve(JobSpec(teacher="gpt-13b", student="gpt-2.7b", cluster="mixed-a100-h100", gpus=16,
                        seq_len=2048, global_batch=32),
                pins=["kd.placement=colocated", "student.pp=2", "student.tp=8", "student.micro_batch=16"])
    plan = make_plan(p, top_k=0)
    st = plan.student.layout.stages
    assert [s.gpu for s in st] == ["a100-80g", "h100-80g"]
    assert st[1].last_layer - st[1].first_layer > st[0].last_layer - st[0].first_layer


def test_every_key_pinned_is_a_simulation():
    pins = ["kd.mode=online", "kd.placement=colocated", "kd.compression=topk:64:8", "teacher.tp=2", "teacher.pp=1",
             "teacher.dp=4", "teacher.micro_batch=2", "teacher.offload=none", "teacher.zero=0", "student.tp=1",
             "student.pp=1", "student.dp=8", "student.zero=1", "student.micro_batch=4", "student.recompute=none",
             "student.sequence_parallel=false", "student.virtual_stages=1", "student.offload=none",
             "student.grad_compression=none"]
    plan = make_plan(resolve(JobSpec(gpus=8, global_batch=64), pins=pins), top_k=0)
    assert plan.solver.status == "fixed" and plan.solver.num_candidates == 1
    assert (plan.teacher.layout.tp, plan.student.layout.dp, str(plan.kd.compression)) == (2, 8, "topk:64:8")


def test_infeasible_names_binding_constraint_and_smallest_fit():
    p = resolve(JobSpec(teacher="llama-3.1-405b", student="llama-3-8b", cluster="dgx-h100", gpus=8, seq_len=4096,
                        global_batch=64), pins=["teacher.offload=none"])
    with pytest.raises(Infeasible) as e:
        make_plan(p)
    msg = str(e.value)
    assert "llama-3.1-405b as teacher" in msg and "needs at least 16 h100-80g" in msg and "you gave 8" in msg
    p = resolve(JobSpec(cluster="dgx-a100-40g", gpus=1, global_batch=16),
                pins=["student.recompute=none", "student.micro_batch=16"])
    with pytest.raises(Infeasible, match=r"micro-batch 16 still needs .* GiB on student pipeline stage 0.*unpin student.recompute"):
        make_plan(p)


def test_cli_json_is_only_the_plan(kdplan_cli, tmp_path):
    r = kdplan_cli("plan", "--gpus", "8", "--global-batch", "64", "--json", "-o", tmp_path / "plan.json", "--top", "2")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["solver"]["status"] == "optimal" and len(plan["alternatives"]) == 2
    r = kdplan_cli("inspect", tmp_path / "plan.json")
    assert r.returncode == 0 and "binds" in r.stdout and "GiB" in r.stdout


def test_cli_infeasible_exits_3(kdplan_cli, tmp_path):
    r = kdplan_cli("plan", "--teacher", "llama-3.1-405b", "--student", "llama-3-8b", "--cluster", "dgx-h100",
                   "--gpus", "8", "--fix", "teacher.offload=none", "-o", tmp_path / "p.json")
    assert r.returncode == 3 and "needs at least 16" in r.stderr and "Traceback" not in r.stderr
