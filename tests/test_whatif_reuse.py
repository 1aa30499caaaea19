"""A sweep reuses work across points (prices shared between GPU counts, layouts and prices shared
between pin values, finished plans): its rows must equal planning every point cold, with a fresh
planner and nothing cached."""

import importlib
import math

from kdplan import whatif as w
from kdplan.jobs import JobSpec
from kdplan.planner import Planner

compose = importlib.import_module("kdplan.cost.compose")

SPEC = dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", seq_len=1024, global_batch=16)
AXES = ["gpus=8,16,24", "kd.compression=auto,topk:64:8"]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_sweep_rows_equal_cold_planning(monkeypatch):
    priced = []  # role prices actually computed (memo misses)
    real = compose.price_role
    monkeypatch.setattr(compose, "price_role", lambda *a, **k: priced.append(1) or real(*a, **k))
    axes = w.parse_sweep(AXES)
    base = w.Base(spec=JobSpec(**SPEC))
    shared = Planner()  # one planner for the whole sweep: everything it can reuse, it reuses
    warm = w.run_sweep(base, axes, plan_fn=lambda p: shared.plan(p, top_k=0), keep_plans=True)
    n_warm = len(priced)
    cold = w.run_sweep(base, axes, plan_fn=lambda p: Planner().plan(p, top_k=0), keep_plans=True)
    n_cold = len(priced) - n_warm
    assert len(warm.rows) == 6 and all(r["feasible"] for r in warm.rows)
    skip = {"solver.solve_time_s"}
    for rw, rc in zip(warm.rows, cold.rows):
        diff = {k: (rw[k], rc.get(k)) for k in rw if k not in skip and not _same(rw[k], rc.get(k))}
        assert not diff, (rw["point"], diff)
    for pw, pc in zip(warm.plans, cold.plans):
        ex = {"created_utc": True, "solver": {"solve_time_s"}}
        assert pw.model_dump(exclude=ex) == pc.model_dump(exclude=ex)
    # the reuse is real: the 8, 16 and 24-GPU points (same nodes) share prices, pins share layouts
    assert n_warm < 0.85 * n_cold, (n_warm, n_cold)
