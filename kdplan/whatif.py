"""What-if sweeps: vary the inputs of one job and plan every point.

A sweep is a list of axes (``--sweep KEY=V1,V2,...``); the points are their cartesian product.
Each point is resolved to a ``Problem`` (the base job with that point's values), planned with
the real planner, and flattened to one row: the point's values, the resolved job, every field of
the plan's ``Prediction`` (dicts and nested models as dotted columns), the chosen layout per
role, KD placement/compression, the solver's status, and derived numbers (scaling efficiency,
hours and dollars for a token budget). A point that cannot be planned is a row with
``feasible = False`` and the reason: a sweep maps where things stop fitting, it does not stop.

Value syntax for numeric keys (documented in examples/whatif/README.md):
- ``8,16,32``        a list;
- ``8..64x2``        geometric range 8, 16, 32, 64 (end inclusive when hit);
- ``8..64+8``        arithmetic range 8, 16, ..., 64;
- ``1,2,4,...,64``   an ellipsis continues the sequence before it: three leading values fix a
                     constant ratio or difference, two leading values mean a difference.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Union, get_args, get_origin

from pydantic import BaseModel

from .cost.job import cluster_price_per_hour
from .errors import Infeasible, InputError, SolverLimit
from .jobs import resolve
from .pins import NUMERIC_PIN_KEYS, PIN_KEYS, check_context_pins, check_expert_pins, check_gpu_pins, check_pins_need_teacher
from .problem import Problem
from .models import is_none, load_model_spec
from .profiles import load_cluster, load_hardware
from .schema import JobSpec, Plan, Prediction
from .schema.cluster import ClusterProfile, GPUGroup
from .search.decode import layout_summary

MAX_POINTS = 10_000  # a guard against typos like 1..1000000+1, not a performance limit
AUTO = "auto"  # for kd.* and layout keys: leave the choice to the solver


def _pos_int(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        i = 0
    if i < 1:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return i


def _pos_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"expected a positive number, got {v!r}")
    return x


def _cluster(v: str) -> str:
    """A preset or YAML, optionally ``@N`` GPUs (e.g. ``dgx-h100@24``) to compare at equal cost."""
    name, gpus = split_cluster(v)
    load_cluster(name, gpus)  # raises InputError naming the known presets or the bad rescale
    return v


def split_cluster(v: str) -> tuple[str, int | None]:
    if "@" not in v:
        return v, None
    name, n = v.rsplit("@", 1)
    return name, _pos_int(n)


def _gpu(v: str) -> str:
    load_hardware(v)
    return v


def _model(role: str) -> Callable[[str], str | None]:
    def parse(v: str) -> str | None:
        if role == "teacher" and is_none(v):
            return None
        load_model_spec(v)
        return v
    return parse


def _students(v: str) -> str:
    """Several students of one teacher, joined by '+' (commas separate sweep values)."""
    names = [x.strip() for x in v.split("+")]
    if not all(names):
        raise ValueError(f"expected students joined by '+', e.g. gpt-1.3b+gpt-2.7b, got {v!r}")
    for n in names:
        load_model_spec(n)
    return v


# key -> (parser, numeric, description). Job keys become resolve() overrides; cluster transforms
# are applied to the resolved cluster; every --fix key becomes a pin (or "auto": no pin).
JOB_KEYS: dict[str, tuple[Callable[[str], Any], bool, str]] = {
    "gpus": (_pos_int, True, "total GPUs (nodes = gpus / GPUs per node)"),
    "cluster": (_cluster, False, "cluster preset or cluster YAML"),
    "gpu": (_gpu, False, "GPU type swapped into every group (links stay the cluster's)"),
    "intra_bw_scale": (_pos_float, True, "multiplies intra-node link bandwidth"),
    "inter_bw_scale": (_pos_float, True, "multiplies inter-node link bandwidth"),
    "seq_len": (_pos_int, True, "tokens per sequence"),
    "global_batch": (_pos_int, True, "sequences per optimizer step"),
    "teacher": (_model("teacher"), False, "teacher preset or config.json ('none': plain training)"),
    "student": (_model("student"), False, "student preset or config.json"),
    "students": (_students, False, "several students of one teacher, joined by '+' (a whole-job plan: whole_job.*)"),
    "dataset_tokens": (_pos_float, True, "unique tokens of the corpus (epochs = tokens / dataset_tokens)"),
    "storage_bw_scale": (_pos_float, True, "multiplies every storage tier's read and write bandwidth"),
    "storage_capacity_scale": (_pos_float, True, "multiplies every storage tier's capacity"),
}


def sweep_keys() -> list[str]:
    return [*JOB_KEYS, *PIN_KEYS]


@dataclass
class Axis:
    """One swept input: its key and parsed values (None in a fix axis means "auto")."""

    key: str
    values: list[Any]
    labels: list[str]

    @property
    def numeric(self) -> bool:
        return self.key in JOB_KEYS and JOB_KEYS[self.key][1] or self.key in NUMERIC_PIN_KEYS


_NUM = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"
_RANGE = re.compile(rf"^({_NUM})\.\.({_NUM})([x+])({_NUM})$")


def _num(s: str) -> float:
    return float(s)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def expand_values(text: str) -> list[str]:
    """Expand lists, ``a..bxk`` / ``a..b+k`` ranges and ``a,b,c,...,z`` ellipses to strings."""
    text = text.strip()
    m = _RANGE.match(text)
    if m:
        a, b, op, k = (_num(m.group(1)), _num(m.group(2)), m.group(3), _num(m.group(4)))
        return _progression(a, b, k if op == "x" else None, k if op == "+" else None, text)
    parts = [p.strip() for p in text.split(",")]
    if any(p == "" for p in parts):
        raise ValueError(f"{text!r} has an empty value")
    if "..." not in parts:
        return parts
    i = parts.index("...")
    if i < 2 or i != len(parts) - 2 or parts.count("...") > 1:
        raise ValueError(f"{text!r}: write an ellipsis as a,b,...,z or a,b,c,...,z")
    try:
        head = [_num(p) for p in parts[:i]]
        end = _num(parts[-1])
    except ValueError:
        raise ValueError(f"{text!r}: an ellipsis needs numbers around it") from None
    diffs = {round(b - a, 12) for a, b in zip(head, head[1:])}
    ratios = {round(b / a, 12) for a, b in zip(head, head[1:]) if a} if all(head) else set()
    if len(head) >= 3 and len(ratios) == 1 and len(diffs) > 1:
        seq = _progression(head[0], end, ratios.pop(), None, text)
    elif len(diffs) == 1:
        seq = _progression(head[0], end, None, diffs.pop(), text)
    else:
        raise ValueError(f"{text!r}: the values before '...' have neither a constant difference nor ratio")
    if [_num(s) for s in seq[:len(head)]] != head:
        raise ValueError(f"{text!r}: the values before '...' do not start the sequence to {parts[-1]}")
    return seq


def _progression(a: float, b: float, ratio: float | None, step: float | None, text: str) -> list[str]:
    if b < a:
        raise ValueError(f"{text!r}: the range end is below its start")
    if ratio is not None and ratio <= 1:
        raise ValueError(f"{text!r}: a geometric range needs a factor above 1")
    if step is not None and step <= 0:
        raise ValueError(f"{text!r}: an arithmetic range needs a positive step")
    out, x = [], a
    while x <= b * (1 + 1e-9):
        out.append(_fmt(round(x, 10)))
        if len(out) > MAX_POINTS:
            raise ValueError(f"{text!r} expands to more than {MAX_POINTS} values")
        x = x * ratio if ratio is not None else a + len(out) * step
    return out


def parse_axis(item: str) -> Axis:
    """``KEY=VALUES`` -> Axis; raises InputError with one line naming the key or value."""
    if "=" not in item:
        raise InputError(f"--sweep {item!r}: expected KEY=V1,V2,... (keys: {', '.join(sweep_keys())})")
    key, text = (s.strip() for s in item.split("=", 1))
    if key not in JOB_KEYS and key not in PIN_KEYS:
        raise InputError(f"--sweep {key!r}: unknown key; known: {', '.join(sweep_keys())}")
    try:
        raw = expand_values(text)
    except ValueError as e:
        raise InputError(f"--sweep {key}: {e}") from None
    values, labels = [], []
    for v in raw:
        try:
            if key in PIN_KEYS:
                val = None if v.lower() == AUTO else PIN_KEYS[key][0](v)
            else:
                val = JOB_KEYS[key][0](v)
        except ValueError as e:
            raise InputError(f"--sweep {key}={v}: {e}") from None
        except InputError as e:
            raise InputError(f"--sweep {key}={v}: {e}") from None
        label = AUTO if val is None and key in PIN_KEYS else (v if val is None else str(val))
        if label not in labels:  # a value listed twice would only repeat a row
            values.append(val)
            labels.append(label)
    return Axis(key, values, labels)


def parse_sweep(items: list[str]) -> list[Axis]:
    axes = [parse_axis(it) for it in items]
    keys = [a.key for a in axes]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise InputError(f"--sweep {dup} is given twice; list all its values in one --sweep")
    if "gpus" in keys and any("@" in v for a in axes if a.key == "cluster" for v in a.values):
        raise InputError("--sweep cluster=NAME@N sets the GPU count; it cannot be combined with a gpus axis")
    n = math.prod(len(a.values) for a in axes)
    if n > MAX_POINTS:
        raise InputError(f"--sweep: {n} points is more than {MAX_POINTS}; narrow the axes")
    return axes


def grid(axes: list[Axis]) -> list[dict[str, tuple[Any, str]]]:
    """The cartesian product: one {key: (value, label)} per point, the last axis varying fastest."""
    return [dict(zip((a.key for a in axes), combo))
            for combo in itertools.product(*(list(zip(a.values, a.labels)) for a in axes))]


# ---- resolving one point ----------------------------------------------------------------

@dataclass
class Base:
    """The base job: a JobSpec plus command-line overrides and pins (as `plan` takes them)."""

    spec: JobSpec
    overrides: dict[str, Any] = field(default_factory=dict)
    pins: list[str] = field(default_factory=list)
    job_path: str | None = None


RESOLVE_PIN_KEYS = ("kd.signal", "kd.loss")
"""Swept pins kdplan.jobs.resolve reads (they decide between logit and sequence-level KD)."""


def point_problem(base: Base, point: dict[str, tuple[Any, str]]) -> Problem:
    """Resolve one point: the base job with this point's values applied."""
    spec, overrides = base.spec, dict(base.overrides)
    for key in ("gpus", "cluster", "seq_len", "global_batch", "teacher", "student", "dataset_tokens"):
        if key in point:
            overrides[key] = point[key][0]
    if "student" in point or "students" in point:  # the point's students replace the base job's list
        spec = spec.model_copy(update={"students": None})
    if "students" in point:
        names = [x.strip() for x in point["students"][0].split("+")]
        overrides["student"], overrides["students"] = names[0], names if len(names) > 1 else None
    if "cluster" in point:
        overrides["cluster"], n = split_cluster(point["cluster"][0])
        if n is not None:
            overrides["gpus"] = n
    if "teacher" in overrides and is_none(overrides["teacher"]):
        overrides["teacher"] = None  # resolve() skips None overrides, so clear it on the spec
        spec = spec.model_copy(update={"teacher": None})
    # Pins that change how the job resolves (logit or sequence-level KD) go through resolve().
    resolving = [f"{k}={v[0]}" for k, v in point.items() if k in RESOLVE_PIN_KEYS and v[0] is not None]
    problem = resolve(spec, overrides=overrides, pins=base.pins + resolving, job_path=base.job_path)
    cluster = problem.cluster
    if "gpu" in point:
        cluster = swap_gpu(cluster, point["gpu"][0])
    if "intra_bw_scale" in point or "inter_bw_scale" in point:
        cluster = scale_bandwidth(cluster, point.get("intra_bw_scale", (1.0, ""))[0],
                                  point.get("inter_bw_scale", (1.0, ""))[0])
    if "storage_bw_scale" in point or "storage_capacity_scale" in point:
        cluster = scale_storage(cluster, point.get("storage_bw_scale", (1.0, ""))[0],
                                point.get("storage_capacity_scale", (1.0, ""))[0])
    pins = dict(problem.pins)
    for key, (val, _) in point.items():
        if key in PIN_KEYS:
            if val is None:
                pins.pop(key, None)
            else:
                pins[key] = val
    if problem.teacher is None:
        check_pins_need_teacher(pins, "--sweep")
    check_gpu_pins(cluster, pins)  # against this point's cluster (swapped GPU, swept pin)
    check_expert_pins(pins, problem.teacher, "--sweep")
    check_context_pins(pins, problem.job.seq_len, "--sweep")
    return replace(problem, cluster=cluster, pins=pins)


def swap_gpu(cluster: ClusterProfile, gpu: str) -> ClusterProfile:
    """Every group's device becomes ``gpu``; node shape and links stay the cluster's."""
    groups = [GPUGroup(node=g.node.model_copy(update={"gpu": gpu}), num_nodes=g.num_nodes)
              for g in cluster.groups]
    spec = load_hardware(gpu)
    return cluster.model_copy(update={"gpus": {gpu: spec}, "groups": groups,
                                      "name": f"{cluster.name}[gpu={gpu}]",
                                      "placeholder": cluster.placeholder or spec.placeholder})


def scale_storage(cluster: ClusterProfile, bandwidth: float, capacity: float) -> ClusterProfile:
    """A copy of the cluster with every storage tier's bandwidths and capacity multiplied."""
    def scaled(t):
        if t is None:
            return None
        return t.model_copy(update={"read_gb_per_s": t.read_gb_per_s * bandwidth,
                                    "write_gb_per_s": t.write_gb_per_s * bandwidth,
                                    "capacity_tb": t.capacity_tb * capacity,
                                    # scaled, it is no longer the free space measured
                                    "capacity_measured": t.capacity_measured if capacity == 1 else None})
    groups = [GPUGroup(node=g.node.model_copy(update={"local_storage": scaled(g.node.local_storage)}),
                       num_nodes=g.num_nodes) for g in cluster.groups]
    return cluster.model_copy(update={"groups": groups, "shared_storage": scaled(cluster.shared_storage)})


def scale_bandwidth(cluster: ClusterProfile, intra: float, inter: float) -> ClusterProfile:
    """A copy of the cluster with every intra-/inter-node link's bandwidth multiplied."""
    groups = []
    for g in cluster.groups:
        n = g.node
        node = n.model_copy(update={
            "intra_node": n.intra_node.model_copy(update={"bandwidth_gb_per_s": n.intra_node.bandwidth_gb_per_s * intra}),
            "inter_node": n.inter_node.model_copy(update={"bandwidth_gb_per_s": n.inter_node.bandwidth_gb_per_s * inter}),
        })
        groups.append(GPUGroup(node=node, num_nodes=g.num_nodes))
    return cluster.model_copy(update={"groups": groups})


# ---- flattening a plan to one row -------------------------------------------------------

def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        subs = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return subs[0] if len(subs) == 1 else None
    return None


def flatten(model_cls: type[BaseModel], obj: BaseModel | None, prefix: str = "") -> dict[str, Any]:
    """Schema-driven flattening: nested models become dotted columns even when they are None
    (so every row has the same columns); dict fields become one column per key."""
    out: dict[str, Any] = {}
    for name, f in model_cls.model_fields.items():
        key = prefix + name
        val = getattr(obj, name) if obj is not None else None
        sub = _submodel(f.annotation)
        if sub is not None:
            out.update(flatten(sub, val, key + "."))
        elif isinstance(val, dict):
            out.update({f"{key}.{k}": v for k, v in val.items()})
        elif get_origin(f.annotation) is dict:
            continue  # an empty dict (or an infeasible point) has no columns of its own
        else:
            out[key] = val
    return out


WHOLE_JOB_FIELDS = ("strategy", "students_arrangement", "teacher_gpus", "total_time_s", "cost_usd", "cache_bytes",
                    "cache_format", "cache_storage", "teacher_passes", "epochs", "speedup_vs_separate_mirror")
ROLE_FIELDS = ("num_gpus", "tp", "pp", "dp", "zero", "micro_batch", "recompute", "offload")


def plan_columns(plan: Plan | None) -> dict[str, Any]:
    """Prediction fields (bare names), chosen layout per role, KD choices and solver status."""
    row = {k: v for k, v in flatten(Prediction, plan.prediction if plan else None).items() if not k.startswith("job.")}
    # the whole job (prediction.job): its scalar numbers, under a prefix apart from the job's inputs
    jb = plan.prediction.job if plan else None
    for f in WHOLE_JOB_FIELDS:
        v = getattr(jb, f) if jb is not None else None
        row[f"whole_job.{f}"] = str(v) if f == "cache_format" and v is not None else v
    row["whole_job.separate_mirror_time_s"] = jb.baselines.separate_mirror.total_time_s if jb is not None else None
    for role in ("teacher", "student"):
        rp = getattr(plan, role) if plan else None
        row[f"plan.{role}"] = layout_summary(rp.layout) if rp else None
        for f in ROLE_FIELDS:
            row[f"plan.{role}.{f}"] = getattr(rp.layout, f) if rp else None
        # which GPU type(s) the role's stages run on (mixed clusters)
        gpus = dict.fromkeys(s.gpu for s in rp.layout.stages if s.gpu) if rp else {}
        row[f"plan.{role}.gpu"] = "+".join(gpus) or None
    row["plan.gpus_used"] = plan.world_size if plan else None
    for f in ("signal", "mode", "placement", "compression"):
        row[f"plan.kd.{f}"] = str(getattr(plan.kd, f)) if plan else None
    for f in ("name", "status", "solve_time_s", "num_candidates"):
        row[f"solver.{f}"] = getattr(plan.solver, f) if plan else None
    return row


def job_columns(problem: Problem | None) -> dict[str, Any]:
    if problem is None:
        return {k: None for k in ("job.teacher", "job.student", "job.cluster", "job.gpus", "job.gpu_types",
                                  "job.seq_len", "job.global_batch", "job.tokens_per_step", "job.memory_limit_gib",
                                  "job.cluster_usd_per_hour")}
    c = problem.cluster
    return {
        "job.teacher": problem.teacher.name if problem.teacher else None,
        "job.student": problem.student.name,
        "job.cluster": c.name,
        "job.gpus": c.num_gpus,
        "job.gpu_types": "+".join(dict.fromkeys(g.node.gpu for g in c.groups)),
        "job.seq_len": problem.job.seq_len,
        "job.global_batch": problem.job.global_batch,
        "job.tokens_per_step": problem.job.seq_len * problem.job.global_batch,
        "job.memory_limit_gib": min(c.gpus[g.node.gpu].memory_gib for g in c.groups),
        "job.cluster_usd_per_hour": cluster_price_per_hour(c),
    }


def budget_columns(row: dict[str, Any], problem: Problem | None, tokens: float | None,
                   price_per_gpu_hour: float | None) -> dict[str, Any]:
    """Wall-clock hours and dollars for ``tokens`` training tokens, including offline KD's
    one-off teacher pass (which runs on the same GPUs before training)."""
    out = {"budget.tokens": tokens, "budget.steps": None, "budget.train_hours": None,
           "budget.teacher_pass_hours": None, "budget.total_hours": None, "budget.usd_per_hour": None,
           "budget.total_usd": None}
    if problem is None or not tokens or not row.get("step_time_s"):
        return out
    steps = tokens / (problem.job.seq_len * problem.job.global_batch)
    train_h = steps * row["step_time_s"] / 3600
    pass_h = steps * (row.get("offline.teacher_pass_s_per_step") or 0.0) / 3600
    usd_h = cluster_price_per_hour(problem.cluster, price_per_gpu_hour)
    out.update({"budget.steps": steps, "budget.train_hours": train_h, "budget.teacher_pass_hours": pass_h,
                "budget.total_hours": train_h + pass_h, "budget.usd_per_hour": usd_h,
                "budget.total_usd": (train_h + pass_h) * usd_h if usd_h is not None else None})
    return out


# ---- the sweep --------------------------------------------------------------------------

Planner = Callable[[Problem], Plan]


@dataclass
class SweepResult:
    axes: list[Axis]
    rows: list[dict[str, Any]]
    plans: list[Plan | None]  # empty unless run_sweep(keep_plans=True): a long sweep stays small
    wall_s: float = 0.0

    def frame(self):
        import pandas as pd  # lazy: `kdplan plan` should not pay for pandas
        return pd.DataFrame(self.rows)


def default_planner() -> Planner:
    """The real planner, without runner-up alternatives (a sweep reports only the best plan).
    Its module-level cache is shared across calls, so repeated points cost nothing."""
    from .planner import make_plan
    return lambda problem: make_plan(problem, top_k=0)


def run_sweep(base: Base, axes: list[Axis], *, plan_fn: Planner | None = None, tokens: float | None = None,
              price_per_gpu_hour: float | None = None, trace_dir: str | None = None, keep_plans: bool = False,
              on_point: Callable[[int, int, dict[str, Any]], None] | None = None) -> SweepResult:
    """Plan every point of the grid. Infeasible or invalid points become rows with a reason.
    With ``trace_dir``, each feasible point's simulated step is written there as a Chrome trace
    (column ``trace``: the file, or why there is none)."""
    plan_fn = plan_fn or default_planner()
    points = grid(axes)
    t0 = time.perf_counter()
    rows, plans = [], []
    for i, point in enumerate(points):
        row: dict[str, Any] = {"point": i, **{k: lab for k, (_, lab) in point.items()}}
        problem = plan = None
        reason = None
        try:
            problem = point_problem(base, point)
            plan = plan_fn(problem)
        except Infeasible as e:
            reason = f"infeasible: {e}"
        except InputError as e:
            reason = f"invalid point: {e}"
        except SolverLimit as e:
            reason = f"not solved: {e}"
        row["feasible"] = plan is not None
        row["reason"] = reason
        row.update(job_columns(problem))
        row.update(plan_columns(plan))
        naive = row.get("baselines.naive_dp.step_time_s")
        row["speedup_vs_naive_dp"] = naive / row["step_time_s"] if naive and row.get("step_time_s") else None
        row.update(budget_columns(row, problem, tokens if tokens is not None else (problem.job.tokens if problem else None),
                                  price_per_gpu_hour))
        if trace_dir is not None:
            row["trace"] = write_point_trace(plan, problem, f"{trace_dir}/point-{i:04d}.json") if plan else None
        rows.append(row)
        if keep_plans:
            plans.append(plan)
        if on_point:
            on_point(i, len(points), row)
    add_scaling_efficiency(rows, axes)
    _align_columns(rows)
    return SweepResult(axes, rows, plans, time.perf_counter() - t0)


def write_point_trace(plan: Plan, problem: Problem, path: str) -> str:
    """The simulator's trace of one point, priced on the point's own problem (its swapped GPU,
    scaled links or cluster YAML); returns the path, or why no trace was written."""
    from .sim import write_trace
    try:
        write_trace(plan, path, problem=problem)
    except InputError as e:
        return f"skipped: {e}"
    return path


def add_scaling_efficiency(rows: list[dict[str, Any]], axes: list[Axis]) -> None:
    """Per-GPU throughput relative to the smallest feasible GPU count of the same series
    (1.0 = linear scaling). Only meaningful when ``gpus`` is swept."""
    others = [a.key for a in axes if a.key != "gpus"]
    ref: dict[tuple, tuple[int, float]] = {}
    for r in rows:
        if r["feasible"] and r.get("tokens_per_s"):
            s = tuple(r[k] for k in others)
            if s not in ref or r["job.gpus"] < ref[s][0]:
                ref[s] = (r["job.gpus"], r["tokens_per_s"])
    has_gpus = any(a.key == "gpus" for a in axes)
    for r in rows:
        s = tuple(r[k] for k in others)
        if has_gpus and r["feasible"] and r.get("tokens_per_s") and s in ref:
            g0, t0 = ref[s]
            r["scaling_efficiency"] = (r["tokens_per_s"] / r["job.gpus"]) / (t0 / g0)
        else:
            r["scaling_efficiency"] = None


def _align_columns(rows: list[dict[str, Any]]) -> None:
    """Every row gets every column (dict fields differ between plans), in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    for i, r in enumerate(rows):
        rows[i] = {c: r.get(c) for c in cols}


def point_label(row: dict[str, Any], axes: list[Axis]) -> str:
    return ", ".join(f"{a.key}={row[a.key]}" for a in axes) or "base"
