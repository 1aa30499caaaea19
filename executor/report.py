"""The run report (kdplan.schema.RunReport): measured numbers next to the plan's prediction."""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import torch

from kdplan.schema import LossPoint, Measured, Plan, PlanRef, Restart, RunReport, StudentMeasured
from kdplan.schema.capability import students_one_after_another

from .train import WARMUP_STEPS, RankStats


def _after_warmup(xs: list[float]) -> list[float]:
    return xs[WARMUP_STEPS:] or xs


def measured(plan: Plan, stats: list[RankStats]) -> Measured:
    students = [s for s in stats if s.role == "student"]
    steps = len(students[0].step_times_s)
    # A step ends when its slowest student rank ends: per step, the max over student ranks.
    step_times = [max(s.step_times_s[i] for s in students) for i in range(steps)]
    waits = [max(s.wait_s[i] for s in students) for i in range(steps)]
    step_time = statistics.median(_after_warmup(step_times)) if steps else 0.0
    kinds: dict[str, float] = {}
    for s in stats:
        for k, v in s.bytes.items():
            kinds[k] = kinds.get(k, 0.0) + v
    losses = next((s.losses for s in students if s.losses), [])
    tokens = plan.job.global_batch * plan.job.seq_len
    busy = [min(1.0, max(0.0, s.busy)) for s in stats]
    return Measured(
        step_time_s=step_time,
        step_times_s=step_times,
        tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
        utilization=sum(busy) / len(busy),
        utilization_per_rank=busy,
        peak_memory_gib=max(s.peak_memory_gib for s in stats),
        peak_memory_per_rank_gib=[s.peak_memory_gib for s in stats],
        bytes_per_step=kinds,
        teacher_wait_s=statistics.median(_after_warmup(waits)) if steps else 0.0,
        teacher_weights_gib=max(s.teacher_weights_gib for s in stats),
        loss=[LossPoint(step=i, total=t, kd=k, ce=c) for i, t, k, c in losses],
        # students one after another: the teacher pass runs once before training (no teacher phase per step)
        teacher_phase_s=(_slowest_median([s.teacher_s for s in students])
                         if students[0].students and any(s.teacher_s for s in students) else None),
        students=per_student(students),
        cache_write_bytes=float(sum(s.cache_write_bytes for s in stats)),
    )


def _slowest_median(per_rank: list[list[float]]) -> float:
    """Median after warm-up of a span whose every step lasts as long as its slowest rank's."""
    n = min((len(x) for x in per_rank), default=0)
    return statistics.median(_after_warmup([max(x[i] for x in per_rank) for i in range(n)])) if n else 0.0


def per_student(students: list[RankStats]) -> list[StudentMeasured]:
    """Each student of a several-student run (RankStats.students, plan order), over the student ranks."""
    out = []
    for k, first in enumerate(students[0].students):
        mine = [s.students[k] for s in students]
        n = min(len(m.step_times_s) for m in mine)
        times = [max(m.step_times_s[i] for m in mine) for i in range(n)]
        kinds: dict[str, float] = {}
        for m in mine:
            for kind, v in m.bytes.items():
                kinds[kind] = kinds.get(kind, 0.0) + v
        losses = next((m.losses for m in mine if m.losses), [])
        out.append(StudentMeasured(student=first.source, step_time_s=_slowest_median([m.step_times_s for m in mine]),
                                   step_times_s=times, bytes_per_step=kinds,
                                   loss=[LossPoint(step=i, total=t, kd=kd, ce=c) for i, t, kd, c in losses]))
    return out


def layout_summary(plan: Plan) -> str:
    s = plan.student.layout
    text = f"student tp{s.tp} pp{s.pp} dp{s.dp} zero{s.zero} mb{s.micro_batch}"
    if s.grad_compression != "none":
        text += f" grad:{s.grad_compression}"
    then = " then" if students_one_after_another(plan) else ""
    for r in plan.extra_students:
        e = r.layout
        text += f";{then} + student {r.source} tp{e.tp} pp{e.pp} dp{e.dp} zero{e.zero} mb{e.micro_batch}"
    if plan.teacher is not None:
        t = plan.teacher.layout
        text += (f"; teacher tp{t.tp} pp{t.pp} dp{t.dp}; kd {plan.kd.mode} {plan.kd.placement}"
                 f" {plan.kd.compression}")
    return text


def build(plan: Plan, plan_path: str, stats: list[RankStats], *, baseline: str | None, device: str,
          steps: int, restarts: list[dict] = ()) -> RunReport:
    data = Path(plan_path).read_bytes() if Path(plan_path).exists() else plan.model_dump_json().encode()
    return RunReport(
        plan=PlanRef(path=str(plan_path), sha256=hashlib.sha256(data).hexdigest()),
        baseline=baseline, world_size=len(stats), device=device, torch_version=torch.__version__,
        steps=steps, warmup_steps=min(WARMUP_STEPS, max(steps - 1, 0)),
        measured=measured(plan, stats), predicted=plan.prediction,
        layout_summary=layout_summary(plan), restarts=[Restart(**r) for r in restarts],
    )


def _predicted_teacher_weights_gib(p: Prediction | None) -> float | None:
    """The teacher's weights on the plan's fullest GPU, where the prediction names them."""
    if p is None:
        return None
    terms = p.memory.terms_gib
    return terms.get("teacher_weights", terms.get("weights") if p.memory.role == "teacher" else None)


def render(report: RunReport) -> str:
    """A short measured-vs-predicted table for the terminal."""
    m, p = report.measured, report.predicted
    rows = [("step time (s)", m.step_time_s, p.step_time_s if p else None),
            ("tokens/s", m.tokens_per_s, p.tokens_per_s if p else None),
            ("utilization", m.utilization, p.utilization if p else None),
            ("peak memory (GiB)", m.peak_memory_gib, p.memory_per_gpu_gib if p else None),
            ("bytes/step", sum(m.bytes_per_step.values()), p.comm_bytes_per_step if p else None)]
    if m.teacher_weights_gib:  # as stored: 1 B + scales per block Linear weight for an fp8 / int8 teacher
        rows.append(("teacher weights GiB", m.teacher_weights_gib, _predicted_teacher_weights_gib(p)))
    lines = [f"{report.layout_summary}  [{report.baseline or 'plan'}, {report.world_size} x {report.device}]",
             f"{'':20s}{'measured':>14s}{'predicted':>14s}"]
    for name, a, b in rows:
        lines.append(f"{name:20s}{a:14.4g}{(f'{b:14.4g}' if b is not None else '             -')}")
    for k, v in sorted(m.bytes_per_step.items()):
        lines.append(f"  bytes/step {k:17s}{v:14.4g}")
    if m.loss:
        first, last = m.loss[0], m.loss[-1]
        lines.append(f"loss (total / kd / ce): step {first.step}: {first.total:.4f} / {first.kd or 0:.4f} / {first.ce:.4f}"
                     f" -> step {last.step}: {last.total:.4f} / {last.kd or 0:.4f} / {last.ce:.4f}")
    for r in report.restarts:
        who = f"rank {r.rank}" if r.rank is not None else "a rank"
        lines.append(f"restart: {who} failed at {r.at_utc}; resumed from step {r.resumed_from_step},"
                     f" {r.steps_redone} step(s) redone")
    if m.cache_write_bytes:
        lines.append(f"teacher-output cache written: {m.cache_write_bytes:.4g} bytes")
    if m.students:
        lines.append(f"teacher phase (s): {m.teacher_phase_s:.4g}, once per step for {len(m.students)} students"
                     if m.teacher_phase_s is not None else f"{len(m.students)} students one after another,"
                     " each reading the cache")
        for st in m.students:
            last = st.loss[-1] if st.loss else None
            lines.append(f"  {st.student}: {st.step_time_s:.4g} s/step, {sum(st.bytes_per_step.values()):.4g} bytes/step"
                         + (f", loss {last.total:.4f} at step {last.step}" if last else ""))
    if m.teacher_wait_s:
        lines.append(f"teacher wait per step (s): {m.teacher_wait_s:.4g}")
    return "\n".join(lines)
