"""Rich rendering of problems and plans (shared by plan and inspect)."""

from __future__ import annotations

from rich.table import Table

from ..jobs import Problem
from ..schema import Plan
from .common import out


def _gib(x: float) -> str:
    return f"{x:,.1f} GiB"


def render_problem(p: Problem) -> None:
    t = Table(title="Resolved inputs", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    for role, m in (("teacher", p.teacher), ("student", p.student)):
        if m is None:
            t.add_row(role, "none (plain training)")
        else:
            t.add_row(role, f"{m.name}: {m.num_params() / 1e9:.2f} B params, {m.num_layers} layers x "
                            f"{m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} KV), vocab {m.vocab_size:,}")
    c = p.cluster
    groups = ", ".join(f"{g.num_nodes} x {g.node.gpus_per_node} {g.node.gpu}" for g in c.groups)
    t.add_row("cluster", f"{c.name}: {c.num_gpus} GPUs ({groups})" + ("  [yellow](placeholder numbers)[/]" if c.placeholder else ""))
    j = p.job
    t.add_row("batch", f"{j.global_batch} sequences x {j.seq_len} tokens = {j.global_batch * j.seq_len:,} tokens/step, {j.precision}")
    t.add_row("kd", f"{j.kd.loss}, T={j.kd.temperature}, alpha={j.kd.alpha}")
    if p.fixes:
        t.add_row("pinned", ", ".join(f"{k}={v}" for k, v in p.fixes.items()))
    out.print(t)


def render_plan(plan: Plan) -> None:
    out.print(plan.model_dump_json(indent=2))
