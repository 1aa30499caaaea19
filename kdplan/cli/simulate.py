"""kdplan simulate PLAN: event simulation of one step (timeline, bubbles, utilization, trace)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from ..sim.step import BUSY, COMM_KINDS
from ..sim.plan_sim import PlanSimulation, load_plan, problem_from_plan, simulate_plan, write_trace
from .common import err, out, run_cli
from .render import markup_safe

# simulator breakdown key -> the closed form's key in prediction.breakdown_s
CLOSED_KEYS = {"teacher_forward": "teacher", "pipeline": "comm_pipeline", "gradients": "comm_gradients",
               "params": "comm_params", "teacher_outputs": "comm_teacher_outputs",
               "tensor_parallel": "comm_tensor_parallel"}


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.3f} s"


def render(sim: PlanSimulation) -> None:
    plan, res = markup_safe(sim.plan), sim.result
    s = plan.student.layout
    kd = "plain training" if plan.teacher is None else f"KD {plan.kd.mode}/{plan.kd.placement}, {plan.kd.compression}"
    out.print(f"[bold]Simulated step[/] of {plan.student.model.name} on {plan.job.gpus} x {plan.job.cluster}: "
              f"student tp {s.tp} x pp {s.pp} x dp {s.dp}, micro-batch {s.micro_batch}, {s.schedule}"
              f"{f' (v={s.virtual_stages})' if s.virtual_stages > 1 else ''}, {kd}")

    t = Table(title="Step time", title_justify="left")
    for c in ("", "seconds", "vs simulated"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("simulated (event)", _s(sim.step_time_s), "")
    for name, x in (("closed form (plan file)", sim.closed_form_s), ("closed form (cost model now)", sim.closed_form_now_s)):
        t.add_row(name, _s(x), f"{100 * (sim.step_time_s - x) / x:+.1f}%" if x else "-")
    out.print(t)

    b = Table(title="Breakdown of the step on the busiest student GPU", title_justify="left")
    for c in ("component", "simulated", "share", "closed form"):
        b.add_column(c, justify="left" if c == "component" else "right")
    bd = dict(res.breakdown_s)
    if sim.overhead_s:
        bd["step_overhead"] = sim.overhead_s
    closed = dict(plan.prediction.breakdown_s)
    if "loss" in closed:  # the simulator replays the loss inside each stage's compute
        closed["compute"] = closed.get("compute", 0.0) + closed.pop("loss")
    seen = set()
    for k, x in sorted(bd.items(), key=lambda kv: -kv[1]):
        ck = CLOSED_KEYS.get(k, k)
        seen.add(ck)
        name = f"exposed comm: {k}" if ck.startswith("comm_") else k
        b.add_row(name, _s(x), f"{100 * x / sim.step_time_s:.1f}%", _s(closed.get(ck)))
    for ck, x in closed.items():
        if ck not in seen:
            b.add_row(ck.replace("comm_", "exposed comm: "), "-", "", _s(x))
    out.print(b)

    g = Table(title="GPUs (one track per pipeline rank of one data-parallel replica; all replicas are alike)",
              title_justify="left")
    for c in ("track", "GPUs", "busy", "utilization", "bubble", "exposed comm", "waits"):
        g.add_column(c, justify="left" if c == "track" else "right")
    for tr in res.tracks:
        if tr.kind != "gpu":
            continue
        idle = tr.idle_s
        busy = sum(tr.busy_by_category_s.get(c, 0.0) for c in BUSY)
        comm = sum(v for k, v in idle.items() if k in COMM_KINDS) + tr.busy_by_category_s.get("params", 0.0)
        waits = ", ".join(f"{k} {_s(v)}" for k, v in idle.items() if k.endswith("wait") and v > 0) or "-"
        g.add_row(escape(sim.track_labels.get(tr.track, tr.track)), str(sim.track_gpus.get(tr.track, 1)), _s(busy),
                  f"{100 * busy / res.step_time_s:.1f}%" if res.step_time_s else "-",
                  _s(idle.get("bubble", 0.0)), _s(comm), waits)
    out.print(g)
    roles = ", ".join(f"{r} {100 * u:.1f}%" for r, u in sim.utilization_by_role.items())
    out.print(f"Utilization (compute-busy fraction over all {plan.job.gpus} GPUs): simulated "
              f"{100 * sim.utilization:.1f}% ({roles}); closed form {100 * plan.prediction.utilization:.1f}%")
    if res.teacher_wait_s:
        out.print(f"Teacher wait: {_s(res.teacher_wait_s)} per step (student stalled on teacher outputs)")


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate_cmd(plan: Annotated[str, typer.Argument(help="plan.json written by `kdplan plan`.")],
                     trace: Annotated[Optional[str], typer.Option("--trace", help="Write a Chrome/Perfetto trace-event JSON of the simulated step.")] = None):
        """Event-simulate one training step of a plan: timeline, bubbles, utilization; --trace writes a Perfetto trace."""
        def body():
            p = load_plan(plan)
            problem = problem_from_plan(p, plan)  # errors name the plan file; paths relative to it
            try:
                sim = write_trace(p, trace, problem) if trace else simulate_plan(p, problem)
            except InputError as e:  # what cannot be priced or simulated is in the plan: name it
                named = plan in str(e) or (trace is not None and trace in str(e))
                raise e if named else InputError(f"{plan}: {e}") from None
            render(sim)
            if trace:
                err.print(f"trace: {escape(trace)} ({len(sim.result.events)} events; open it in https://ui.perfetto.dev)")
        run_cli(body)
