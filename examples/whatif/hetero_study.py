"""Heterogeneous what-if: does a mixed A100 + H100 cluster beat all-H100 or all-A100 at equal cost?

The idea to test: the teacher only runs forward (no gradients, no optimizer state), so it could
live on older A100s while the student trains on H100s. Three clusters cost the same $96/h at the
profiles' prices: 24 A100 + 16 H100 (mixed-24a100-16h100.yaml), 48 A100, and 32 H100. kdplan
plans GPT-13B -> GPT-1.3B on each, chooses which group each role runs on, and prices 10B tokens.
Run from the repository root:

    python examples/whatif/hetero_study.py --out whatif-hetero

The same from the command line:

    kdplan whatif examples/seed/job.toml --tokens 1e10 \\
      --sweep cluster=examples/whatif/mixed-24a100-16h100.yaml@40,dgx-a100-80g@48,dgx-h100@32
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
from kdplan.plots import plot_sweep

HERE = Path(__file__).resolve().parent
JOB = HERE.parent / "seed" / "job.toml"
CLUSTERS = f"{HERE / 'mixed-24a100-16h100.yaml'}@40,dgx-a100-80g@48,dgx-h100@32"


def table(rows: list[dict], tokens: float) -> Table:
    t = Table(title=f"GPT-13B -> GPT-1.3B at equal cost: {tokens:.3g} tokens", title_justify="left")
    for c in ("cluster", "GPUs", "$/h", "tokens/s", "M tokens per $", "teacher on", "student on", "kd",
              "hours", "USD"):
        t.add_column(c, justify="left" if c in ("cluster", "teacher on", "student on", "kd") else "right")
    for r in rows:
        name = Path(r["cluster"].split("@")[0]).stem
        if not r["feasible"]:
            t.add_row(name, str(r["job.gpus"]), *["-"] * 7, f"[red]{r['reason']}[/]")
            continue
        usd_h = r["job.cluster_usd_per_hour"]
        per_usd = r["tokens_per_s"] * 3600 / usd_h / 1e6 if usd_h else None
        t.add_row(name, f"{r['job.gpus']} ({r['job.gpu_types']})", f"{usd_h:.0f}", f"{r['tokens_per_s']:,.0f}",
                  f"{per_usd:.1f}" if per_usd else "-",
                  f"{r['plan.teacher.num_gpus']} x {r['plan.teacher.gpu']}", f"{r['plan.student.num_gpus']} x {r['plan.student.gpu']}",
                  f"{r['plan.kd.placement']}/{r['plan.kd.compression']}",
                  f"{r['budget.total_hours']:.1f}", f"{r['budget.total_usd']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="whatif-hetero", help="folder for hetero.csv and hetero.png")
    ap.add_argument("--tokens", type=float, default=1e10, help="training tokens to price")
    args = ap.parse_args(argv)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:
        out = Console(width=200)
    try:
        axes = w.parse_sweep([f"cluster={CLUSTERS}"])
        res = w.run_sweep(w.Base(spec=load_job(str(JOB)), job_path=str(JOB)), axes, tokens=args.tokens)
    except KdplanError as e:
        err.print(f"error: {e}")
        return e.exit_code
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res.frame().to_csv(Path(args.out) / "hetero.csv", index=False)
    plot_sweep(res.rows, axes, str(Path(args.out) / "hetero.png"),
               "Equal cost ($96/h): 24 A100 + 16 H100 vs 48 A100 vs 32 H100, GPT-13B -> GPT-1.3B")
    out.print(table(res.rows, args.tokens))
    err.print(f"{len(res.rows)} points in {res.wall_s:.1f} s; wrote {args.out}/hetero.csv, hetero.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
