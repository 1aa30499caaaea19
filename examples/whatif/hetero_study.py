"""Heterogeneous what-if: the forward-only teacher on older A100s, the student on newer H100s,
against all-H100 and all-A100 clusters of equal cost.

The idea to test: the teacher only runs forward (no gradients, no optimizer state), so it could
live on older A100s while the student trains on H100s. Three clusters cost the same $96/h at the
profiles' prices ($2.0 per A100-hour, $3.0 per H100-hour): 24 A100 + 16 H100
(mixed-24a100-16h100.yaml), 48 A100 and 32 H100. On the mixed cluster the teacher is pinned to
the A100s and the student to the H100s (``--fix teacher.gpu=a100-80g --fix student.gpu=h100-80g``);
the reverse pins and the planner's own choice are shown for reference. GPT-13B -> GPT-1.3B, the
seed job (examples/seed/job.toml), priced for 10B tokens. Run from the repository root:

    python examples/whatif/hetero_study.py --out whatif-hetero

From the command line (the pins as sweep axes: the four group choices of the mixed cluster,
co-located on one group included; then the two homogeneous clusters):

    kdplan whatif examples/seed/job.toml --cluster examples/whatif/mixed-24a100-16h100.yaml --gpus 40 --tokens 1e10 \\
      --sweep teacher.gpu=a100-80g,h100-80g --sweep student.gpu=a100-80g,h100-80g
    kdplan whatif examples/seed/job.toml --tokens 1e10 --sweep cluster=dgx-a100-80g@48,dgx-h100@32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdplan import whatif as w
from kdplan.errors import KdplanError
from kdplan.jobs import load_job

HERE = Path(__file__).resolve().parent
JOB = HERE.parent / "seed" / "job.toml"
MIXED = str(HERE / "mixed-24a100-16h100.yaml")

# (label, cluster, pins): every row is one planned point.
CASES = [
    ("mixed: teacher A100, student H100", f"{MIXED}@40", ["teacher.gpu=a100-80g", "student.gpu=h100-80g"]),
    ("mixed: teacher H100, student A100", f"{MIXED}@40", ["teacher.gpu=h100-80g", "student.gpu=a100-80g"]),
    ("mixed: planner's choice", f"{MIXED}@40", []),
    ("48 A100", "dgx-a100-80g@48", []),
    ("32 H100", "dgx-h100@32", []),
]


def run(tokens: float) -> list[dict]:
    spec = load_job(str(JOB))
    rows = []
    for label, cluster, pins in CASES:
        base = w.Base(spec=spec, pins=pins, job_path=str(JOB))
        res = w.run_sweep(base, w.parse_sweep([f"cluster={cluster}"]), tokens=tokens)
        rows.append({"case": label, "pins": " ".join(pins) or "-", **res.rows[0]})
    return rows


def _gpus(r: dict) -> str:
    n = r["job.gpus"]
    if "+" in (r["job.gpu_types"] or ""):
        return f"{n} ({r['job.gpu_types']})"
    return f"{n} x {r['job.gpu_types']}"


def table(rows: list[dict], tokens: float) -> Table:
    t = Table(title=f"GPT-13B -> GPT-1.3B at equal cost ($/h from the profiles), {tokens:.3g} tokens",
              title_justify="left")
    cols = ("cluster", "GPUs", "$/h", "step time (s)", "tokens/s", "tokens per $", "teacher on", "student on",
            "idle", "kd", "hours", "USD")
    for c in cols:
        t.add_column(c, justify="left" if c in ("cluster", "GPUs", "teacher on", "student on", "kd") else "right")
    for r in rows:
        if not r["feasible"]:
            t.add_row(r["case"], _gpus(r), *["-"] * 9, f"[red]{r['reason']}[/]")
            continue
        usd_h = r["job.cluster_usd_per_hour"]
        per_usd = r["tokens_per_s"] * 3600 / usd_h if usd_h else None
        t.add_row(r["case"], _gpus(r), f"{usd_h:.0f}", f"{r['step_time_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                  f"{per_usd:,.0f}" if per_usd else "-",
                  f"{r['plan.teacher.num_gpus']} x {r['plan.teacher.gpu']}",
                  f"{r['plan.student.num_gpus']} x {r['plan.student.gpu']}",
                  str(r["job.gpus"] - r["plan.gpus_used"]),
                  f"{r['plan.kd.placement']}/{r['plan.kd.compression']}",
                  f"{r['budget.total_hours']:.1f}", f"{r['budget.total_usd']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="whatif-hetero", help="folder for hetero.csv")
    ap.add_argument("--tokens", type=float, default=1e10, help="training tokens to price")
    args = ap.parse_args(argv)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:
        out = Console(width=220)
    try:
        rows = run(args.tokens)
    except KdplanError as e:
        err.print(f"error: {e}")
        return e.exit_code
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import pandas as pd
    pd.DataFrame(rows).to_csv(Path(args.out) / "hetero.csv", index=False)
    out.print(table(rows, args.tokens))
    from kdplan.models import load_model_spec
    spec = load_job(str(JOB))
    t, s = load_model_spec(spec.teacher), load_model_spec(spec.student)
    out.print(f"work per token: teacher forward 2 x {t.num_params() / 1e9:.1f} B = {2 * t.num_params() / 1e9:.0f} GFLOP, "
              f"student training 6 x {s.num_params() / 1e9:.1f} B = {6 * s.num_params() / 1e9:.0f} GFLOP "
              f"(ratio {2 * t.num_params() / (6 * s.num_params()):.1f}, attention aside)")
    ok = [r for r in rows if r["feasible"] and r["job.cluster_usd_per_hour"]]
    if ok:
        best = max(ok, key=lambda r: r["tokens_per_s"] / r["job.cluster_usd_per_hour"])
        hyp = rows[0]
        line = f"most tokens per dollar: {best['case']}"
        if hyp["feasible"] and hyp is not best:
            line += (f"; the teacher-on-A100 split gives {hyp['tokens_per_s'] / best['tokens_per_s']:.2f}x its "
                     "tokens per dollar")
        out.print(line)
    err.print(f"wrote {args.out}/hetero.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
