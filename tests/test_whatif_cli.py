"""kdplan whatif end to end, through the real CLI and the real planner (small, fast sweeps)."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from kdplan import whatif as w
from kdplan.search.decode import layout_summary
from kdplan.schema import Plan, Prediction

SEED = "examples/seed/job.toml"


def _whatif(kdplan_cli, tmp_path, *args):
    csv = tmp_path / "sweep.csv"
    r = kdplan_cli("whatif", *args, "--csv", csv)
    assert r.returncode == 0, r.stderr
    return pd.read_csv(csv), r


def test_csv_columns_match_the_plans_prediction_fields(kdplan_cli, tmp_path):
    r = kdplan_cli("plan", SEED, "--gpus", "8", "-o", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    df, _ = _whatif(kdplan_cli, tmp_path, SEED, "--sweep", "gpus=8")
    expected = {k: v for k, v in w.flatten(Prediction, plan.prediction).items() if not k.startswith("job.")}
    missing = [c for c in expected if c not in df.columns]
    assert not missing, missing
    for name, f in Prediction.model_fields.items():  # every field is a column or the prefix of columns
        if "dict" in str(f.annotation) and not getattr(plan.prediction, name):
            continue  # an empty dict has no keys to flatten (a non-empty one is checked above)
        prefix = "whole_job" if name == "job" else name  # prediction.job: its scalars, apart from the job's inputs
        assert name in df.columns or any(c.startswith(prefix + ".") for c in df.columns), name
    row = df.iloc[0]
    for col, val in expected.items():
        if isinstance(val, float):
            assert row[col] == pytest.approx(val, rel=1e-9), col
    assert row["plan.student"] == layout_summary(plan.student.layout)
    assert row["solver.status"] == plan.solver.status


def test_parquet_has_the_same_table(kdplan_cli, tmp_path):
    r = kdplan_cli("whatif", SEED, "--sweep", "gpus=1,2", "--csv", tmp_path / "a.csv", "--parquet", tmp_path / "a.parquet")
    assert r.returncode == 0, r.stderr
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_parquet(tmp_path / "a.parquet")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 2
    assert b["tokens_per_s"].tolist() == pytest.approx(a["tokens_per_s"].tolist())


def test_plot_is_a_real_png(kdplan_cli, tmp_path):
    png = tmp_path / "sweep.png"
    r = kdplan_cli("whatif", SEED, "--sweep", "gpus=1,2,4", "--sweep", "kd.compression=auto,dense", "--plot", png)
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    img = mpimg.imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert img.std() > 0.05 and len(data) > 50_000  # axes, curves and text, not a blank canvas


def test_infeasible_and_invalid_points_are_rows_with_a_reason(kdplan_cli, tmp_path):
    df, r = _whatif(kdplan_cli, tmp_path, "--teacher", "none", "--student", "llama-3-70b", "--cluster", "dgx-h100",
                    "--seq-len", "4096", "--global-batch", "64", "--sweep", "gpus=1,8,12")
    assert df["feasible"].tolist() == [False, True, False]
    assert df["reason"][0].startswith("infeasible:") and "llama-3-70b" in df["reason"][0]
    assert df["reason"][2].startswith("invalid point:") and "12" in df["reason"][2]
    assert math.isnan(df["step_time_s"][0]) and df["step_time_s"][1] > 0
    assert "3 points (1 feasible)" in r.stderr


def test_more_gpus_never_predict_lower_throughput(kdplan_cli, tmp_path):
    # global batch 512 divides evenly over every count, so no count is held back by the batch
    df, _ = _whatif(kdplan_cli, tmp_path, SEED, "--sweep", "gpus=1,2,4,8,16")
    assert df["feasible"].all()
    tput = df["tokens_per_s"].tolist()
    assert all(b >= a * (1 - 1e-9) for a, b in zip(tput, tput[1:])), tput
    assert df["scaling_efficiency"][0] == pytest.approx(1.0)


def test_cluster_transforms_move_the_prediction_the_right_way(kdplan_cli, tmp_path):
    df, _ = _whatif(kdplan_cli, tmp_path, SEED, "--gpus", "16", "--sweep", "gpu=a100-80g,h100-80g",
                    "--sweep", "inter_bw_scale=0.1,1")
    t = {(g, s): v for g, s, v in zip(df["gpu"], df["inter_bw_scale"], df["step_time_s"])}
    assert t[("h100-80g", 1)] < t[("a100-80g", 1)]  # a faster GPU in the same nodes
    for g in ("a100-80g", "h100-80g"):
        assert t[(g, 0.1)] >= t[(g, 1)] * (1 - 1e-9)  # a slower network never helps
    assert set(df["job.gpu_types"]) == {"a100-80g", "h100-80g"}


def test_budget_hours_and_dollars_include_the_offline_teacher_pass(kdplan_cli, tmp_path):
    df, _ = _whatif(kdplan_cli, tmp_path, SEED, "--gpus", "8", "--tokens", "1e9", "--price-per-gpu-hour", "2.5",
                    "--sweep", "kd.mode=online,offline")
    steps = 1e9 / (2048 * 512)
    for _, r in df.iterrows():
        train = steps * r["step_time_s"] / 3600
        assert r["budget.train_hours"] == pytest.approx(train)
        assert r["budget.total_usd"] == pytest.approx(r["budget.total_hours"] * 8 * 2.5)
    off = df[df["kd.mode"] == "offline"].iloc[0]
    assert off["plan.kd.mode"] == "offline" and off["budget.teacher_pass_hours"] > 0
    assert off["budget.total_hours"] == pytest.approx(off["budget.train_hours"] + off["budget.teacher_pass_hours"])
    on = df[df["kd.mode"] == "online"].iloc[0]
    assert on["budget.teacher_pass_hours"] == 0


def test_json_rows_on_stdout(kdplan_cli):
    r = kdplan_cli("whatif", SEED, "--sweep", "gpus=1,2", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["gpus"] for x in rows] == ["1", "2"] and all(x["feasible"] for x in rows)


def test_trace_dir_writes_one_trace_per_point(kdplan_cli, tmp_path):
    traces = tmp_path / "traces"
    df, r = _whatif(kdplan_cli, tmp_path, SEED, "--sweep", "gpus=1,8", "--trace-dir", traces)
    files = sorted(traces.glob("*.json"))
    assert [f.name for f in files] == ["point-0000.json", "point-0001.json"], r.stderr
    assert df["trace"].tolist() == [str(f) for f in files]
    events = json.loads(files[1].read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert any(e.get("ph") == "X" and e.get("dur", 0) > 0 for e in events)


def test_trace_of_a_swapped_gpu_point_is_simulated_on_that_gpu(kdplan_cli, tmp_path):
    # the swapped GPU lives only in this sweep: each point's trace must be priced on its own cluster
    df, r = _whatif(kdplan_cli, tmp_path, SEED, "--gpus", "8", "--sweep", "gpu=a100-80g,h100-80g",
                    "--trace-dir", tmp_path / "t")
    spans = []
    for f in df["trace"]:
        events = json.loads(Path(f).read_text())
        events = events["traceEvents"] if isinstance(events, dict) else events
        spans.append(max(e["ts"] + e.get("dur", 0) for e in events if e.get("ph") == "X") / 1e6)
    assert spans == pytest.approx(df["step_time_s"].tolist(), rel=0.01), (spans, r.stderr)
    assert spans[1] < 0.6 * spans[0]  # the H100 point is not the A100 one re-simulated


def test_seed_study_example_runs(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("seed_study", "examples/whatif/seed_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--gpus", "1,8", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"seed.csv", "seed-sweep.png", "seed-baselines.png"}
    out = capsys.readouterr().out
    assert "naive DP" in out and "mirror" in out and "kdplan" in out
