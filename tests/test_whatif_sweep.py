"""kdplan whatif: sweep syntax, validation, point resolution and row flattening (no planner needed
except where the real CLI is driven; see test_whatif_cli.py for end-to-end sweeps)."""

import pytest

from kdplan import whatif as w
from kdplan.errors import Infeasible, InputError
from kdplan.jobs import load_job
from kdplan.schema import Layout, Plan, Prediction, RolePlan
from kdplan.schema.compression import parse_compression
from kdplan.schema.plan import JobSummary

SEED = "examples/seed/job.toml"


@pytest.mark.parametrize("text,expected", [
    ("8,16,32", ["8", "16", "32"]),
    ("8..64x2", ["8", "16", "32", "64"]),
    ("8..60x2", ["8", "16", "32"]),
    ("8..64+8", ["8", "16", "24", "32", "40", "48", "56", "64"]),
    ("1,2,4,...,64", ["1", "2", "4", "8", "16", "32", "64"]),
    ("1,2,...,5", ["1", "2", "3", "4", "5"]),
    ("0.25..1x2", ["0.25", "0.5", "1"]),
    ("dense,topk:64", ["dense", "topk:64"]),
])
def test_expand_values(text, expected):
    assert w.expand_values(text) == expected


@pytest.mark.parametrize("text", ["8..4x2", "8..64x1", "8..64+0", "1,2,5,...,64", "a,b,...,z", "1,,2",
                                  "1,...,8", "1,2,...,4,...,8"])
def test_expand_values_rejects(text):
    with pytest.raises(ValueError):
        w.expand_values(text)


def test_parse_axis_values_and_auto():
    a = w.parse_axis("kd.placement=auto,colocated,disaggregated")
    assert a.values == [None, "colocated", "disaggregated"] and a.labels[0] == "auto"
    assert w.parse_axis("gpus=8,8,16").values == [8, 16]  # repeats would only repeat rows
    assert w.parse_axis("teacher=none,gpt-13b").values == [None, "gpt-13b"]
    assert w.parse_axis("student.tp=1,2").numeric and not w.parse_axis("gpu=h100-80g").numeric


@pytest.mark.parametrize("item,needle", [
    ("gpuz=1,2", "unknown key"), ("gpus=1,x", "positive integer"), ("gpus=0", "positive integer"),
    ("gpu=b200", "unknown GPU type"), ("cluster=nope", "unknown cluster preset"),
    ("kd.compression=topk:0", "K must be"), ("intra_bw_scale=0", "positive number"),
    ("student.recompute=some", "expected one of"), ("gpus", "expected KEY=V1"),
])
def test_parse_axis_rejects(item, needle):
    with pytest.raises(InputError, match=needle):
        w.parse_axis(item)


def test_sweep_guards():
    with pytest.raises(InputError, match="given twice"):
        w.parse_sweep(["gpus=1", "gpus=2"])
    with pytest.raises(InputError, match="more than"):
        w.parse_sweep(["gpus=1..200+1", "seq_len=1..100+1"])
    assert len(w.grid(w.parse_sweep(["gpus=1,2,4", "kd.compression=dense,topk:64"]))) == 6


@pytest.mark.parametrize("sweep,needle", [
    ("gpuz=1,2", "unknown key"), ("gpus=1,two", "positive integer"), ("gpu=b200", "unknown GPU type"),
    ("kd.mode=sometimes", "expected one of"), ("gpus=64..8x2", "end is below"),
])
def test_cli_bad_sweep_exits_2_with_one_line(kdplan_cli, sweep, needle):
    r = kdplan_cli("whatif", "--sweep", sweep)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def _base(**overrides):
    return w.Base(spec=load_job(SEED), job_path=SEED, **overrides)


def _point(**kv):
    return {k: (w.parse_axis(f"{k}={v}").values[0], str(v)) for k, v in kv.items()}


def test_point_problem_applies_cluster_transforms_and_pins():
    p = w.point_problem(_base(pins=["kd.placement=colocated"]),
                        _point(gpus=16, gpu="h100-80g", inter_bw_scale=0.5, **{"kd.compression": "topk:64"}))
    assert p.num_gpus == 16 and set(p.cluster.gpus) == {"h100-80g"}
    assert all(g.node.gpu == "h100-80g" for g in p.cluster.groups)
    assert p.cluster.groups[0].node.inter_node.bandwidth_gb_per_s == pytest.approx(12.5)
    assert p.cluster.groups[0].node.intra_node.bandwidth_gb_per_s == pytest.approx(300)
    assert p.pins == {"kd.placement": "colocated", "kd.compression": parse_compression("topk:64")}
    # "auto" removes a pin the base job holds
    p2 = w.point_problem(_base(pins=["kd.placement=colocated"]), _point(**{"kd.placement": "auto"}))
    assert "kd.placement" not in p2.pins
    assert w.point_problem(_base(), _point(teacher="none")).teacher is None


def test_point_problem_invalid_combination_is_input_error():
    with pytest.raises(InputError, match="whole number"):
        w.point_problem(_base(), _point(gpus=12))


def _fake_plan(problem):
    """A stand-in planner with a known answer, to check the sweep machinery alone."""
    n = problem.num_gpus
    if n > 16:
        raise Infeasible("needs at most 16 GPUs (fake)")
    st = 10.0 / n
    pred = Prediction(step_time_s=st, tokens_per_s=1e6 / st, mfu=0.5, memory_per_gpu_gib=40.0,
                      comm_bytes_per_step=1e9, utilization=0.9, breakdown_s={"compute": st},
                      bytes_per_step={"gradients": 1e9})
    role = RolePlan(source="x", model=problem.student, layout=Layout(dp=n, num_gpus=n))
    return Plan(job=JobSummary(cluster="c", gpus=n, gpus_per_node=8, seq_len=2048, global_batch=512),
                student=role, prediction=pred)


def test_run_sweep_rows_infeasible_and_invalid_points():
    axes = w.parse_sweep(["gpus=8,12,16,32"])
    res = w.run_sweep(_base(), axes, plan_fn=_fake_plan, tokens=1e9, price_per_gpu_hour=2.0)
    rows = res.rows
    assert [r["feasible"] for r in rows] == [True, False, True, False]
    assert rows[1]["reason"].startswith("invalid point:") and "whole number" in rows[1]["reason"]
    assert rows[3]["reason"] == "infeasible: needs at most 16 GPUs (fake)"
    assert len({tuple(r) for r in rows}) == 1  # every row has every column, in one order
    assert rows[2]["scaling_efficiency"] == pytest.approx(1.0)  # fake planner scales linearly
    assert rows[0]["breakdown_s.compute"] == pytest.approx(10 / 8)
    steps = 1e9 / (2048 * 512)
    assert rows[0]["budget.total_hours"] == pytest.approx(steps * 10 / 8 / 3600)
    assert rows[0]["budget.total_usd"] == pytest.approx(rows[0]["budget.total_hours"] * 8 * 2.0)


def test_flatten_covers_every_prediction_field():
    cols = w.flatten(Prediction, None)
    for name, f in Prediction.model_fields.items():
        if w._submodel(f.annotation) or "dict" not in str(f.annotation):
            assert name in cols or any(c.startswith(name + ".") for c in cols), name
    assert "baselines.mirror.step_time_s" in cols and "offline.teacher_pass_s_per_step" in cols


def test_cluster_at_n_and_the_equal_cost_example_clusters():
    a = w.parse_axis("cluster=examples/whatif/mixed-24a100-16h100.yaml@40,dgx-a100-80g@48,dgx-h100@32")
    probs = [w.point_problem(_base(), {"cluster": (v, v)}) for v in a.values]
    assert [p.num_gpus for p in probs] == [40, 48, 32]
    assert probs[0].cluster.is_mixed
    # the three cost the same per hour at the profiles' prices: the premise of hetero_study.py
    assert {w.cluster_price_per_hour(p.cluster) for p in probs} == {96.0}
    with pytest.raises(InputError, match="cannot be combined"):
        w.parse_sweep(["cluster=dgx-h100@32", "gpus=8,16"])
    with pytest.raises(InputError, match="whole number"):
        w.parse_axis("cluster=dgx-h100@12")


@pytest.mark.parametrize("args,needle", [
    (["--csv", "/no/such/folder/x.csv"], "does not exist"), (["--plot", "x.txt"], ".png"),
    (["--price-per-gpu-hour", "-1"], "non-negative"),
])
def test_cli_bad_outputs_exit_2_before_planning(kdplan_cli, args, needle):
    r = kdplan_cli("whatif", "--sweep", "gpus=1", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
