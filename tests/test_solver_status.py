"""The solver's statuses are distinct (issue 14): optimal; time limit with a layout in hand
(planned, status time_limit, the gap printed); time limit before any layout (exit 1 naming the
limit); proven infeasible (exit 3)."""

from __future__ import annotations

import json
import os

import pytest

from kdplan.errors import SolverLimit
from kdplan.jobs import load_job, resolve
from kdplan.planner import Planner
from kdplan.search import ilp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "examples", "seed", "job.toml")
TINY = os.path.join(ROOT, "examples", "tiny-cpu", "job.toml")


def _job_with_limit(tmp_path, base: str, limit_s: float) -> str:
    """The example job (presets only, no relative paths) with a [solver] table added."""
    text = open(base).read()
    assert "[solver]" not in text
    path = tmp_path / "job.toml"
    path.write_text(text + f"\n[solver]\ntime_limit_s = {limit_s}\n")
    return str(path)


def test_a_1ms_limit_before_any_layout_exits_1_naming_the_limit(tmp_path, kdplan_cli):
    job = _job_with_limit(tmp_path, SEED, 0.001)
    r = kdplan_cli("plan", job, "-o", tmp_path / "plan.json")
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the solver hit its 1 ms time limit before finding any layout; raise [solver] time_limit_s" in lines[0]
    assert "fit" not in lines[0]  # not reported as infeasible
    assert not (tmp_path / "plan.json").exists()
    with pytest.raises(SolverLimit):
        Planner().plan(resolve(load_job(job)))


def test_a_limit_with_a_layout_in_hand_is_planned_with_its_gap(tmp_path, monkeypatch, kdplan_cli):
    """HiGHS decides by wall clock when it stops, so which solve reaches the limit with a layout in
    hand cannot be arranged by time; the real solver runs, and its first objective solve is
    reported as HiGHS reports a time limit with an incumbent (gap 4%)."""
    real = ilp._status
    calls = []

    def first_solve_limited(prob, name, gap):
        status, g = real(prob, name, gap)
        calls.append(status)
        return ("time_limit", 0.04) if len(calls) == 1 and status == "optimal" else (status, g)

    monkeypatch.setattr(ilp, "_status", first_solve_limited)
    plan = Planner().plan(resolve(load_job(TINY), job_path=TINY))
    assert calls[0] == "optimal"  # the stand-in replaced a real result
    assert plan.solver.status == "time_limit" and plan.solver.gap == pytest.approx(0.04)
    monkeypatch.undo()
    proven = Planner().plan(resolve(load_job(TINY), job_path=TINY))
    assert proven.solver.status == "optimal" and proven.solver.gap == 0.0
    assert plan.student.layout == proven.student.layout  # the layout found is planned as it is


def test_cli_prints_a_time_limited_plan_as_not_proven(tmp_path, kdplan_cli):
    plan = json.loads(kdplan_cli("plan", TINY, "--json").stdout)
    plan["solver"].update(status="time_limit", gap=0.04)
    (tmp_path / "limited.json").write_text(json.dumps(plan))
    r = kdplan_cli("inspect", tmp_path / "limited.json")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "time_limit (stopped at its time limit: not proven optimal, gap 4.00%; raise [solver] time_limit_s)" in text


def test_proven_infeasible_exits_3(kdplan_cli, tmp_path):
    r = kdplan_cli("plan", "--teacher", "llama-3.1-405b", "--student", "llama-3-8b", "--cluster", "dgx-h100",
                   "--gpus", "8", "--fix", "teacher.offload=none", "-o", tmp_path / "p.json")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "time limit" not in r.stderr and not (tmp_path / "p.json").exists()


def test_status_reads_highs_itself(monkeypatch):
    """pulp maps every HiGHS time limit to "integer feasible"; _status asks HiGHS whether its
    primal solution is feasible."""
    highspy = pytest.importorskip("highspy")

    class Info:
        def __init__(self, feasible, gap):
            self.primal_solution_status = int(highspy.SolutionStatus.kSolutionStatusFeasible) if feasible else 0
            self.mip_gap = gap

    class Model:
        def __init__(self, status, feasible, gap=float("inf")):
            self.status, self.info = status, Info(feasible, gap)

        def getModelStatus(self):
            return self.status

        def getInfo(self):
            return self.info

    class Prob:
        def __init__(self, model):
            self.solverModel = model

    M = highspy.HighsModelStatus
    assert ilp._status(Prob(Model(M.kTimeLimit, True, 0.25)), "highs", 0.0) == ("time_limit", 0.25)
    assert ilp._status(Prob(Model(M.kTimeLimit, True)), "highs", 0.0) == ("time_limit", None)
    assert ilp._status(Prob(Model(M.kTimeLimit, False)), "highs", 0.0) == ("no_solution", None)
    assert ilp._status(Prob(Model(M.kInfeasible, False)), "highs", 0.0) == ("infeasible", None)
    assert ilp._status(Prob(Model(M.kOptimal, True, 0.0)), "highs", 0.0) == ("optimal", 0.0)
