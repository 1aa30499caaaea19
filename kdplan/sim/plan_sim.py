"""Simulate a plan: rebuild its problem, price it with the cost model, replay one step.

The plan carries everything needed: both models inlined, the cluster by name or path (rescaled
to the plan's GPU count; a caller holding the resolved problem, e.g. a what-if point with a
swapped GPU, passes it as ``problem=``), the batch and both layouts. The cost model supplies per-stage, per-micro-batch
times taken apart (``StageTime``: compute, one send, TP share, exposed ZeRO-3 gathers and
offload, the whole gradient reduction); this module hands them to ``simulate_step`` as plain
numbers, with blocking pipeline sends as the cost model prices them (kdplan/cost/api.py). Only one data-parallel replica of each role is
simulated: every replica runs the same schedule on the same kind of GPUs, so each track stands
for the tp x dp GPUs of one pipeline rank. That keeps a 1,024-GPU plan to a few thousand tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .. import cost
from ..cost.api import Candidate
from ..errors import InputError
from ..io import load_model, relative_to_file, write_atomic
from ..problem import Problem
from ..profiles import load_cluster
from ..schema.job import JobSpec
from ..schema.layers import split_layers
from ..schema.plan import Layout, Plan
from .step import SimResult, StudentInput, TeacherInput, simulate_step
from .trace import trace_json


@dataclass
class PlanSimulation:
    plan: Plan
    result: SimResult
    step_time_s: float  # simulated step + the cluster's fixed per-step overhead
    overhead_s: float
    track_labels: dict[str, str] = field(default_factory=dict)
    track_gpus: dict[str, int] = field(default_factory=dict)  # GPUs each track stands for
    utilization: float = 0.0  # compute-busy fraction averaged over every GPU of the plan
    utilization_by_role: dict[str, float] = field(default_factory=dict)
    closed_form_now_s: float = 0.0  # the cost model's closed form for this layout today

    @property
    def closed_form_s(self) -> float:
        return self.plan.prediction.step_time_s

    @property
    def difference(self) -> float:
        """(simulated - closed form) / closed form."""
        return (self.step_time_s - self.closed_form_s) / self.closed_form_s if self.closed_form_s else 0.0


def load_plan(path: str) -> Plan:
    return load_model(Plan, path)


def problem_from_plan(plan: Plan, plan_path: str | None = None) -> Problem:
    """The problem a plan was made for: its inlined models and its cluster (a preset name, or a
    cluster YAML path relative to the plan file), rebuilt with whole nodes around its GPUs.
    Errors name the plan file (``plan_path``) and the field."""
    j = plan.job
    where = plan_path or "plan"
    try:
        job = JobSpec(teacher=plan.teacher.source if plan.teacher else None, student=plan.student.source,
                      cluster=j.cluster, gpus=j.gpus, seq_len=j.seq_len, global_batch=j.global_batch,
                      precision=j.precision, tokens=j.tokens)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"{where}: field 'job.{'.'.join(map(str, err.get('loc', ())))}': {err.get('msg', e)}") from None
    # The plan records the GPUs it uses; a disaggregated plan may leave part of a node idle, so
    # the cluster is rebuilt with whole nodes around them.
    per = j.gpus_per_node
    try:
        cluster = load_cluster(relative_to_file(j.cluster, plan_path),  # as a job file's paths
                               j.gpus if j.gpus <= per else -(-j.gpus // per) * per)
    except InputError as e:
        raise InputError(f"{where}: field 'job.cluster': {e}") from None
    # Sequence-level KD: the teacher generated the text before training (prediction.generation);
    # the step is the student's cross-entropy step alone.
    teacher = plan.teacher.model if plan.teacher and plan.kd.signal == "logits" else None
    return Problem(job=job, teacher=teacher, student=plan.student.model, cluster=cluster)


def _group(problem: Problem, lay: Layout) -> int:
    gpu = lay.stages[0].gpu if lay.stages else None
    names = [g.node.gpu for g in problem.cluster.groups]
    return names.index(gpu) if gpu in names else 0


def candidate_from_plan(plan: Plan, problem: Problem) -> Candidate:
    st = plan.student.layout
    te = plan.teacher.layout if plan.teacher and problem.teacher is not None else None
    layers = None
    if st.stages and st.virtual_stages == 1:
        layers = tuple(s.last_layer - s.first_layer for s in st.stages)
        if layers == split_layers(problem.student.num_layers, st.pp):
            layers = None
    groups = None
    if problem.cluster.is_mixed and st.stages and st.virtual_stages == 1:
        names = [g.node.gpu for g in problem.cluster.groups]
        groups = tuple(names.index(s.gpu) if s.gpu in names else 0 for s in st.stages)
    return Candidate(student=st, teacher=te, mode=plan.kd.mode if te is not None else "online", placement=plan.kd.placement,
                     compression=plan.kd.compression,
                     student_group=_group(problem, st), teacher_group=_group(problem, te) if te else 0,
                     student_stage_layers=layers, student_stage_groups=groups)


def _per_chunk(xs: list[float], v: int) -> list[float]:
    """Per-rank values (all chunks together) as per virtual stage in model order (c * p + r)."""
    return [x / v for _ in range(v) for x in xs]


def sim_inputs(plan: Plan, problem: Problem) -> tuple[StudentInput, TeacherInput | None]:
    """Plain simulator inputs for a plan: the cost model's stage times (``StageTime``), taken
    apart into compute, sends, TP share, exposed ZeRO-3 gathers and the whole gradient reduction."""
    c = candidate_from_plan(plan, problem)
    st = c.student
    s = cost.price_student(problem, st, compression=c.compression, mode=c.mode, placement=c.placement,
                           group=c.student_group, stage_layers=c.student_stage_layers,
                           stage_groups=c.student_stage_groups)
    if not s.stages:  # structurally invalid (not merely out of memory): nothing to replay
        raise InputError(f"plan cannot be priced: {s.why or 'the student has no pipeline stages'}")
    v, p, m = st.virtual_stages, st.pp, s.num_micro_batches
    ranks = s.stages
    layers = list(c.student_stage_layers or split_layers(problem.student.num_layers, p))
    n_buckets = max(1, min(layers) // v) if problem.cluster.overheads.overlap_grad_reduce else 1
    student = StudentInput(
        forward_s=_per_chunk([x.busy_forward_s for x in ranks], v),
        backward_s=_per_chunk([x.busy_backward_s for x in ranks], v),
        p2p_s=[x.p2p_s for _ in range(v) for x in ranks],
        num_micro_batches=m, pp=p, schedule=st.schedule if v == 1 or st.schedule != "gpipe" else "1f1b",
        dp_reduce_s=[x.grad_reduce_s for x in ranks], dp_buckets=n_buckets, optimizer_s=s.optimizer_s,
        params_wait_s=[x.params_s + x.offload_s for x in ranks],
        tp_share=[x.tp_s / (x.busy_forward_s + x.busy_backward_s or 1.0) for x in ranks])
    if problem.teacher is None or c.teacher is None:
        return student, None
    x = cost.price_transfer(problem, c)
    if c.mode == "offline":
        return student, TeacherInput("offline", transfer_s=x.time_s / m, max_in_flight=plan.kd.max_in_flight)
    te = c.teacher
    t = cost.price_teacher(problem, te, compression=c.compression,
                           group=c.teacher_group if c.placement == "disaggregated" else c.student_group)
    if not t.stages:
        raise InputError(f"plan cannot be priced: teacher {t.why or 'has no stages'}")
    scale = t.num_micro_batches / m  # teacher work per student micro-batch
    fwd = [(y.busy_forward_s + y.params_s + y.offload_s) * scale for y in t.stages]
    p2p = [y.p2p_s * scale for y in t.stages]
    if c.placement == "colocated":
        if te.pp != p:  # another split: every GPU carries a share, the slowest at its steady rate
            fwd, p2p = [t.steady_time_s / m] * p, []
        return student, TeacherInput("colocated", fwd, p2p, transfer_s=x.time_s / m)
    return student, TeacherInput("disaggregated", fwd, p2p, transfer_s=x.time_s / m,
                                 max_in_flight=plan.kd.max_in_flight)


def _labels(plan: Plan, res: SimResult) -> tuple[dict[str, str], dict[str, int]]:
    """Human track names (with the ranks and GPU counts they stand for) and GPUs per GPU track."""
    labels, gpus = {}, {}
    for t in res.tracks:
        if t.track.endswith("grad-sync"):
            labels[t.track] = f"student stage {t.track.split()[1][1:]}: gradient reduction (dp)"
        elif t.track.startswith("link s"):
            a, b = t.track[6:].split("->s")
            labels[t.track] = f"link stage {a} -> {b} (student pipeline)"
        elif t.track.startswith("link teacher s"):
            a, b = t.track[14:].split("->s")
            labels[t.track] = f"link teacher stage {a} -> {b}"
    roles = [("student", plan.student.layout)] + ([("teacher", plan.teacher.layout)] if plan.teacher else [])
    for role, lay in roles:
        if role == "teacher" and plan.kd.placement != "disaggregated":
            continue
        n = lay.stage_gpus
        for r in range(lay.pp):
            ranks = lay.stages[r].ranks if lay.stages and r < len(lay.stages) else []
            if n == 1:
                where = f"GPU {ranks[0]}, " if ranks else ""
                labels[f"{role} s{r}"] = f"{role} {where}stage {r}"
            else:
                span = f"ranks {min(ranks)}-{max(ranks)}, " if ranks else ""
                labels[f"{role} s{r}"] = (f"{role} stage {r} ({span}{n} GPUs alike: tp {lay.tp} x dp {lay.dp}"
                                          + (f" x cp {lay.cp})" if lay.cp > 1 else ")"))
            gpus[f"{role} s{r}"] = n
    return labels, gpus


def simulate_plan(plan: Plan, problem: Problem | None = None) -> PlanSimulation:
    """Event-simulate one step of ``plan`` (one representative data-parallel replica per role).

    ``problem``: price the plan on this resolved problem (e.g. a what-if's swapped GPU, scaled
    links or cluster YAML) instead of rebuilding it from the plan's cluster name."""
    problem = problem if problem is not None else problem_from_plan(plan)
    student, teacher = sim_inputs(plan, problem)
    try:
        res = simulate_step(student, teacher, blocking_p2p=True)
    except ValueError as e:
        raise InputError(f"plan cannot be simulated: {e}") from None
    over = problem.cluster.overheads.step_overhead_s
    labels, gpus = _labels(plan, res)
    step = res.step_time_s + over
    busy: dict[str, float] = {}
    count: dict[str, float] = {}
    share = {f"student s{r}": x for r, x in enumerate(student.tp_share)}  # per rank (sim_inputs)
    for t in res.tracks:
        if t.kind == "gpu" and t.track in gpus:
            b = t.busy_by_category_s
            work = (b.get("forward", 0.0) + b.get("backward", 0.0)) * (1 - share.get(t.track, 0.0)) + \
                b.get("teacher_forward", 0.0) + b.get("optimizer", 0.0)
            busy[t.role] = busy.get(t.role, 0.0) + gpus[t.track] * work
            count[t.role] = count.get(t.role, 0.0) + gpus[t.track]
    by_role = {r: busy[r] / (count[r] * step) for r in busy if step}
    util = sum(busy.values()) / (sum(count.values()) * step) if count and step else 0.0
    now = cost.compose(problem, candidate_from_plan(plan, problem))[0]
    return PlanSimulation(plan, res, step, over, labels, gpus, util, by_role, now)


def write_trace(plan: Plan | str, path: str | Path, problem: Problem | None = None) -> PlanSimulation:
    """Simulate ``plan`` (a Plan or a plan.json path) and write its Chrome/Perfetto trace;
    ``problem`` as in ``simulate_plan``."""
    if not isinstance(plan, Plan):
        plan_path = str(plan)
        plan = load_plan(plan_path)
        if problem is None:
            problem = problem_from_plan(plan, plan_path)
    sim = simulate_plan(plan, problem)
    s = plan.student.layout
    title = f"student tp{s.tp} pp{s.pp} dp{s.dp} mb{s.micro_batch} {s.schedule}, kd {plan.kd.mode}/{plan.kd.placement}"
    write_atomic(path, trace_json(sim.result, sim.track_labels, title))
    return sim
