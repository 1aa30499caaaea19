"""`kdplan calibrate`: fit the cost model's coefficients to measured run reports.

Each report names the plan it ran; the plan holds everything needed to price its layout again
(models, layouts, KD settings, batch). Calibration re-prices every report's layout with the real
cost model (kdplan.cost.evaluate) under candidate coefficients and minimises

    mean_r log(predicted_r / measured_r)^2  +  lam * sum_k log(c_k / c_k0)^2

by coordinate descent (a golden-section search per coefficient, in log space, a few sweeps),
then Levenberg-Marquardt from there (it follows the valleys coordinate descent stalls in).
The small pull towards the profile's values (lam) keeps coefficients the reports cannot tell
apart where the profile measured them. Step time and peak memory are fitted separately: their
coefficients do not interact. A guard then moves from the old to the fitted coefficients only as
far as no report's own error grows beyond max(its error before, ``tolerance``) while the total
error falls (halving the step; the old coefficients always qualify). The tolerance (default 10%,
the run-to-run spread of step times measured on a shared machine) lets a report that is already
predicted within the noise move inside it: with a strict "no report gets worse" rule, one report
predicted 6% high pins the whole fit while six others are 20-60% low. When the best fit breaks the
guard and no point on the way to it passes, the fit is run again with the guard as a penalty
(each report's error beyond its bound), and the guard then checks that result.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..io import load_model, sha256_file
from ..problem import Problem
from ..schema.cluster import ClusterFile, ClusterProfile, Provenance
from ..schema.job import JobSpec, KDSettings
from ..schema.plan import Plan
from ..schema.report import RunReport
from .fit import golden_section, levenberg_marquardt

LAMBDA = 1e-5  # pull towards the starting coefficients, per squared log-ratio


@dataclass(frozen=True)
class Knob:
    """One coefficient: where it lives in the cluster profile and its range."""

    path: tuple[str, ...]  # e.g. ("gpus", "cpu-core", "efficiency", "max_fraction")
    lo: float
    hi: float
    target: str  # "time" or "memory"

    @property
    def name(self) -> str:
        return ".".join(map(str, self.path))


def knobs_for(cluster: ClusterProfile) -> list[Knob]:
    out: list[Knob] = []
    for g in sorted({grp.node.gpu for grp in cluster.groups}):
        e = ("gpus", g, "efficiency")
        out += [Knob(e + ("max_fraction",), 0.01, 1.0, "time"),
                Knob(e + ("half_saturation_gflop",), 1e-6, 1e4, "time"),
                Knob(e + ("attention_fraction",), 1e-3, 1.0, "time")]
        eff = cluster.gpus[g].efficiency
        # the elementwise price the profile uses (an older profile's fraction of the GEMMs, or its share of the bandwidth)
        if eff.elementwise_bandwidth_fraction is not None:
            out.append(Knob(e + ("elementwise_bandwidth_fraction",), 1e-3, 10.0, "time"))
        elif eff.elementwise_overhead_fraction is not None:
            out.append(Knob(e + ("elementwise_overhead_fraction",), 1e-3, 10.0, "time"))
    for i in range(len(cluster.groups)):
        for tier in ("intra_node", "inter_node"):
            if tier == "inter_node" and cluster.groups[i].num_nodes == 1:
                continue  # a single node never uses it: the reports cannot say anything
            n = ("groups", i, "node", tier)
            out += [Knob(n + ("latency_us",), 0.01, 1e5, "time"), Knob(n + ("efficiency",), 1e-3, 1.0, "time")]
    out += [Knob(("overheads", "step_overhead_s"), 1e-5, 100.0, "time"),
            Knob(("overheads", "optimizer_bytes_per_s_fraction"), 1e-3, 1.0, "time"),
            Knob(("overheads", "loss_bytes_per_s_fraction"), 1e-3, 1.0, "time"),
            Knob(("overheads", "overlap_slowdown"), 1.0, 10.0, "time"),
            Knob(("overheads", "layer_overhead_s"), 1e-7, 1.0, "time"),
            Knob(("overheads", "framework_memory_gib"), 1e-3, 1e3, "memory"),
            Knob(("overheads", "fragmentation_fraction"), 1e-4, 1.0, "memory")]
    return out


def _get(d: dict, path: tuple) -> float:
    for p in path:
        d = d[p]
    return d  # type: ignore[return-value]


def _set(d: dict, path: tuple, value: float) -> None:
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


# ---- reports -> re-priceable cases ----------------------------------------------------------

@dataclass
class Case:
    """One measured run, ready to be priced again under other coefficients."""

    path: str
    sha256: str
    plan: Plan
    measured_step_s: float
    measured_memory_gib: float
    reported_step_s: float | None  # the plan's own prediction (to check the re-pricing)


def load_case(path: str) -> Case:
    report = load_model(RunReport, path)
    if report.measured.step_time_s <= 0:
        raise InputError(f"{path}: field 'measured.step_time_s' is 0; the run measured no steps")
    plan_path = Path(report.plan.path)
    if not plan_path.is_absolute():
        beside = Path(path).parent / plan_path
        plan_path = beside if beside.is_file() else plan_path
    if not plan_path.is_file() and report.plan.path:
        # a report moved with its plan (e.g. committed under benchmarks/results/, where plan.json
        # is git-ignored): a JSON file next to it whose bytes are the ones that ran, the plan's
        # own name first
        here = Path(path).parent
        named = here / Path(report.plan.path).name
        for moved in [named] + sorted(p for p in here.glob("*.json") if p != named and p.name != Path(path).name):
            if moved.is_file() and sha256_file(str(moved)) == report.plan.sha256:
                plan_path = moved
                break
    if not plan_path.is_file():  # (an empty path is the report's own folder)
        raise InputError(f"{path}: field 'plan.path': plan file {report.plan.path} not found "
                         f"(looked next to the report, for a JSON file of its sha256 there, and in the current folder)")
    plan = load_model(Plan, plan_path)
    if plan.extra_students:
        # the report's step time covers every student (in turn within a step, or one after another
        # summed per step index) while a plan prices its first student's step: refused, not misread
        raise InputError(f"{path}: field 'plan.extra_students': the run trained {1 + len(plan.extra_students)} students,"
                         " and calibration fits the step of one; calibrate on single-student runs"
                         " (kdplan plan --student NAME, then kdplan run)")
    if report.baseline is not None:  # a baseline run measured the baseline's layouts, not the plan's
        try:
            plan = plan.baseline(report.baseline)
        except ValueError as e:
            raise InputError(f"{path}: field 'baseline': {e}") from None
        except KeyError:  # a name that is no baseline ('' made this exit 1: tests/test_fuzz_fields.py)
            raise InputError(f"{path}: field 'baseline': unknown baseline {report.baseline!r}") from None
    return Case(path=path, sha256=sha256_file(path), plan=plan, measured_step_s=report.measured.step_time_s,
                measured_memory_gib=report.measured.peak_memory_gib,
                reported_step_s=report.predicted.step_time_s if report.predicted else None)


def _group_of(cluster: ClusterProfile, gpu: str | None) -> int:
    for i, g in enumerate(cluster.groups):
        if g.node.gpu == gpu:
            return i
    return 0


def problem_and_candidate(plan: Plan, cluster: ClusterProfile):
    """The cost model's inputs for the layout a plan describes, on ``cluster``."""
    from ..cost import Candidate
    from ..profiles import scale_cluster

    if plan.job.gpus != cluster.num_gpus:
        try:
            cluster = scale_cluster(cluster, plan.job.gpus)
        except InputError:
            pass  # keep the cluster as is: the layout's rank counts still price correctly
    kd = plan.kd
    job = JobSpec(teacher=plan.teacher.source if plan.teacher else None, student=plan.student.source,
                  cluster=plan.job.cluster, gpus=plan.job.gpus, seq_len=plan.job.seq_len,
                  global_batch=plan.job.global_batch, precision=plan.job.precision,
                  kd=KDSettings(loss=kd.loss, temperature=kd.temperature, alpha=kd.alpha, beta=kd.beta,
                                hidden_state_dim=kd.hidden_state_dim))
    problem = Problem(job=job, teacher=plan.teacher.model if plan.teacher else None, student=plan.student.model,
                      cluster=cluster)
    st = plan.student.layout
    stage_layers = None
    if st.stages and st.virtual_stages == 1:
        stage_layers = tuple(s.last_layer - s.first_layer for s in st.stages)
    te = plan.teacher.layout if plan.teacher else None
    cand = Candidate(student=st, teacher=te, mode=kd.mode, placement=kd.placement,
                     compression=kd.compression,
                     student_group=_group_of(cluster, st.stages[0].gpu if st.stages else None),
                     teacher_group=_group_of(cluster, te.stages[0].gpu if te and te.stages else None),
                     student_stage_layers=stage_layers)
    return problem, cand


def predict(case: Case, cluster: ClusterProfile) -> tuple[float, float]:
    """(step time s, peak memory GiB per device) the cost model predicts for a case."""
    from ..cost import evaluate
    from ..errors import Infeasible
    problem, cand = problem_and_candidate(case.plan, cluster)
    try:
        p = evaluate(problem, cand, with_baselines=False)
    except Infeasible:  # these coefficients say the layout cannot run; it did, so they are wrong
        return math.inf, math.inf
    return p.step_time_s, p.memory_per_gpu_gib


# ---- the fit --------------------------------------------------------------------------------

def _log_err(pred: float, meas: float) -> float:
    if not (pred > 0 and math.isfinite(pred)) or meas <= 0:
        return 1e6
    return math.log(pred / meas) ** 2


def rel_err(pred: float, meas: float) -> float:
    """|pred - meas| / meas, capped at 1e6 so that an unpriceable layout still compares."""
    return min(1e6, abs(pred - meas) / meas) if meas > 0 else 1e6


@dataclass
class Result:
    cluster: ClusterProfile
    before: list[tuple[float, float]]  # per case: (step s, memory GiB) predicted before
    after: list[tuple[float, float]]
    changed: dict[str, tuple[float, float]]  # knob name: (old, new)
    guard_step: dict[str, float]  # target: fraction of the fitted move kept (1 = all, 0 = none)


TOLERANCE = 0.10  # errors below this are measurement noise to the guard (see the module docstring)
PENALTIES = (1e3, 1e5, 1e7)  # weights of a report's error beyond its guard bound in the guarded re-fit


def calibrate(cases: list[Case], cluster: ClusterProfile, *, sweeps: int = 4, lam: float = LAMBDA,
              fit_memory: bool = True, tolerance: float = TOLERANCE) -> Result:
    """Fit the cluster's coefficients to the cases; see the module docstring."""
    if not cases:
        raise InputError("calibrate needs at least one run report")
    base = cluster.model_dump()
    start = {k.name: float(_get(base, k.path)) for k in knobs_for(cluster)}
    knobs = knobs_for(cluster)

    def build(values: dict[str, float]) -> ClusterProfile:
        d = cluster.model_dump()
        for k in knobs:  # inside the knob's range (a line search can overshoot it by a rounding error)
            _set(d, k.path, min(k.hi, max(k.lo, values[k.name])))
        return ClusterProfile.model_validate(d)

    def per_case(values: dict[str, float]) -> list[tuple[float, float]]:
        cl = build(values)
        return [predict(c, cl) for c in cases]

    before = per_case(start)
    values = dict(start)
    guard: dict[str, float] = {}
    targets = ["time"] + (["memory"] if fit_memory else [])
    for target in targets:
        idx = 0 if target == "time" else 1
        meas = [c.measured_step_s if target == "time" else c.measured_memory_gib for c in cases]
        mine = [k for k in knobs if k.target == target]

        def objective(vals: dict[str, float]) -> float:
            preds = per_case(vals)
            fit = sum(_log_err(p[idx], m) for p, m in zip(preds, meas)) / len(meas)
            # a coefficient that starts at zero (the profile did not model that term) is pulled
            # towards its floor: the reports must show the term, not just make room for it
            prior = sum(math.log(max(vals[k.name], k.lo) / (start[k.name] or k.lo)) ** 2 for k in mine)
            return fit + lam * prior

        fitted = dict(values)
        for _ in range(sweeps):
            for k in mine:
                lo, hi = math.log(k.lo), math.log(k.hi)

                def f(u: float, k=k) -> float:
                    return objective(dict(fitted, **{k.name: min(k.hi, math.exp(u))}))

                u, fu = golden_section(f, lo, hi, iters=32)
                if fu < objective(fitted) * (1 - 1e-9):  # a real improvement, not rounding
                    fitted[k.name] = min(k.hi, math.exp(u))
        # Then Levenberg-Marquardt on the same objective, from there: coefficients that trade off
        # against each other (the loss bandwidth and the matmul efficiency both scale with the
        # tokens) form valleys that one-at-a-time search leaves half-way down.
        # Only coefficients the profile measured (a prior holds them): one that starts at zero has
        # no pull, and LM would explain everything with it.
        lm_knobs = [k for k in mine if start[k.name] > 0]
        names = [k.name for k in lm_knobs]
        u_lo, u_hi = [math.log(k.lo) for k in lm_knobs], [math.log(k.hi) for k in lm_knobs]

        def residuals(u: list[float]) -> list[float]:
            vals = dict(fitted, **{n: math.exp(x) for n, x in zip(names, u)})
            preds = per_case(vals)
            out = [math.sqrt(_log_err(p[idx], m) / len(meas)) * (1 if p[idx] >= m else -1) for p, m in zip(preds, meas)]
            return out + [math.sqrt(lam) * (x - math.log(start[n])) for n, x in zip(names, u)]

        u0 = [math.log(max(fitted[k.name], k.lo)) for k in lm_knobs]
        u = levenberg_marquardt(residuals, u0, u_lo, u_hi)
        lm = dict(fitted, **{n: math.exp(x) for n, x in zip(names, u)})
        if objective(lm) < objective(fitted):
            fitted = lm
        moved, t = _guarded(values, fitted, [k.name for k in mine], per_case, meas, idx, tolerance)
        if t < 1:
            # The best fit makes some report worse than the guard allows, and the straight path
            # to it is no better (coefficients that trade off make it curve: seen, every report
            # worse half-way). Fit again with the guard as a penalty, so the optimiser itself
            # keeps every report inside max(its error before, tolerance).
            errs0 = [rel_err(p[idx], m) for p, m in zip(per_case(values), meas)]
            caps = [max(e0, tolerance) * 0.98 for e0 in errs0]

            constrained, moved2, t2 = dict(fitted), moved, t
            for weight in PENALTIES:  # stiffer until the guard holds (the penalty is soft)
                def guarded_residuals(u: list[float], w: float = weight) -> list[float]:
                    preds = per_case(dict(fitted, **{n: math.exp(x) for n, x in zip(names, u)}))
                    over = [max(0.0, rel_err(p[idx], m) - c) for p, m, c in zip(preds, meas, caps)]
                    return residuals(u) + [math.sqrt(w) * o for o in over]

                u = levenberg_marquardt(guarded_residuals, [math.log(constrained[n]) for n in names], u_lo, u_hi)
                constrained = dict(fitted, **{n: math.exp(x) for n, x in zip(names, u)})
                moved2, t2 = _guarded(values, constrained, [k.name for k in mine], per_case, meas, idx, tolerance)
                if t2 == 1.0:
                    break
            total = [sum(rel_err(p[idx], m) for p, m in zip(per_case(v), meas)) for v in (moved, moved2)]
            if t2 > 0 and total[1] < total[0]:
                moved, t = moved2, t2
        values, guard[target] = moved, t
    after = per_case(values)
    changed = {k.name: (start[k.name], values[k.name]) for k in knobs
               if not math.isclose(start[k.name], values[k.name], rel_tol=1e-3)}
    return Result(build(values), before, after, changed, guard)


def _guarded(old: dict[str, float], new: dict[str, float], names: list[str],
             per_case: Callable[[dict[str, float]], list[tuple[float, float]]], meas: list[float],
             idx: int, tolerance: float = 0.0) -> tuple[dict[str, float], float]:
    """Move from old towards new (geometric interpolation) as far as no case's error grows beyond
    max(its old error, tolerance) and the total error falls."""
    errs0 = [rel_err(p[idx], m) for p, m in zip(per_case(old), meas)]
    t = 1.0
    while t >= 1 / 64:
        vals = dict(old)
        for n in names:
            vals[n] = old[n] ** (1 - t) * new[n] ** t if old[n] > 0 else new[n] * t
        errs = [rel_err(p[idx], m) for p, m in zip(per_case(vals), meas)]
        if all(e <= max(e0, tolerance) + 1e-12 for e, e0 in zip(errs, errs0)) and sum(errs) < sum(errs0):
            return vals, t
        t /= 2
    return old, 0.0


def calibrated_file(result: Result, cases: list[Case], *, command: str, source: str) -> ClusterFile:
    """The calibrated profile as a self-contained cluster file (GPU specs inline)."""
    cl = result.cluster
    t_before = [rel_err(b[0], c.measured_step_s) for b, c in zip(result.before, cases)]
    t_after = [rel_err(a[0], c.measured_step_s) for a, c in zip(result.after, cases)]
    notes = (f"calibrated from {source} on {len(cases)} report(s): mean step-time error "
             f"{sum(t_before) / len(cases):.1%} -> {sum(t_after) / len(cases):.1%}; changed "
             + (", ".join(f"{n} {a:.4g}->{b:.4g}" for n, (a, b) in result.changed.items()) or "nothing"))
    gpus = dict(cl.gpus)
    for name in result.changed:
        if name.startswith("gpus."):
            g = name.split(".")[1]
            gpus[g] = gpus[g].model_copy(update={"placeholder": False})
    for g, spec in gpus.items():
        eff = spec.efficiency
        if any(n.startswith(f"gpus.{g}.efficiency") for n in result.changed):
            gpus[g] = spec.model_copy(update={"efficiency": eff.model_copy(update={
                "source": f"kdplan calibrate on {len(cases)} run report(s), starting from: {eff.source}"})})
    prov = Provenance(kind="calibration", date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                      host=cl.provenance.host, device=cl.provenance.device,
                      torch_version=cl.provenance.torch_version, command=command,
                      reports=[f"{c.path} sha256:{c.sha256}" for c in cases], notes=notes)
    return ClusterFile(schema_version=cl.schema_version, name=cl.name, description=cl.description, gpus=gpus,
                       groups=cl.groups, overheads=cl.overheads, provenance=prov, placeholder=False)
