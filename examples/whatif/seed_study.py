"""The seed study, made reproducible: GPT-13B -> GPT-1.3B on 1 to 64 A100-80GB.

For every GPU count it plans the job and prints single-GPU KD, naive data-parallel KD, mirror KD
(teacher co-located with the student's own layout) and kdplan's plan side by side: step time,
speedup, bytes moved per step and utilization, all from the same cost model. Writes a CSV and
two pictures. Run from the repository root:

    python examples/whatif/seed_study.py --out whatif-seed

The same sweep from the command line (without the side-by-side table):

    kdplan whatif examples/seed/job.toml --sweep gpus=1,2,4,...,64 --plot seed.png --csv seed.csv
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
from kdplan.plots import plot_baselines, plot_sweep

JOB = Path(__file__).resolve().parent.parent / "seed" / "job.toml"
APPROACHES = (("single GPU", "baselines.single_gpu"), ("naive DP", "baselines.naive_dp"),
              ("mirror", "baselines.mirror"), ("kdplan", ""))


def _get(row: dict, prefix: str, field: str):
    return row.get(f"{prefix}.{field}" if prefix else field)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def side_by_side(rows: list[dict]) -> list[Table]:
    """Two tables: time (step time, kdplan's speedup) and traffic (bytes moved, utilization)."""
    time_t = Table(title="Step time (s) and kdplan's speedup", title_justify="left")
    comm_t = Table(title="GB moved per step and utilization (busy fraction, mean over GPUs)", title_justify="left")
    time_t.add_column("GPUs", justify="right")
    comm_t.add_column("GPUs", justify="right")
    for name, _ in APPROACHES:
        time_t.add_column(name, justify="right")
    for name, _ in APPROACHES[:3]:
        time_t.add_column(f"vs {name}", justify="right")
    time_t.add_column("kdplan: student | teacher layout, kd")
    for name, _ in APPROACHES[1:]:
        comm_t.add_column(f"{name} GB", justify="right")
    for name, _ in APPROACHES[1:]:
        comm_t.add_column(f"{name} util", justify="right")
    for r in rows:
        g = str(r["job.gpus"])
        if not r["feasible"]:
            time_t.add_row(g, *["-"] * 7, f"[red]{r['reason']}[/]")
            continue
        step = r["step_time_s"]
        cells = [_fmt(_get(r, p, "step_time_s"), ".3f") for _, p in APPROACHES]
        for _, p in APPROACHES[:3]:
            b = _get(r, p, "step_time_s")
            cells.append(_fmt(b / step if b else None, ".2f") + "x")
        kd = f"{r['plan.kd.mode']}/{r['plan.kd.placement']}/{r['plan.kd.compression']}"
        time_t.add_row(g, *cells, f"{r['plan.student']} | {r['plan.teacher']}, {kd}")
        traffic = [_fmt(b / 1e9 if (b := _get(r, p, "comm_bytes_per_step")) is not None else None, ",.1f")
                   for _, p in APPROACHES[1:]]
        util = [_fmt(_get(r, p, "utilization"), ".0%") for _, p in APPROACHES[1:]]
        comm_t.add_row(g, *traffic, *util)
    return [time_t, comm_t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="whatif-seed", help="folder for seed.csv and the pictures")
    ap.add_argument("--gpus", default="1,2,4,...,64", help="GPU counts (sweep syntax)")
    args = ap.parse_args(argv)
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # a file or pager: keep the tables whole
        out = Console(width=200)
    try:
        axes = w.parse_sweep([f"gpus={args.gpus}"])
        res = w.run_sweep(w.Base(spec=load_job(str(JOB)), job_path=str(JOB)), axes)
    except KdplanError as e:
        err.print(f"error: {e}")
        return e.exit_code
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res.frame().to_csv(Path(args.out) / "seed.csv", index=False)
    title = "Seed study: GPT-13B -> GPT-1.3B on A100-80GB, seq 2048, batch 512"
    plot_sweep(res.rows, axes, str(Path(args.out) / "seed-sweep.png"), title)
    plot_baselines(res.rows, str(Path(args.out) / "seed-baselines.png"), title)
    for table in side_by_side(res.rows):
        out.print(table)
    err.print(f"{len(res.rows)} points in {res.wall_s:.1f} s; wrote {args.out}/seed.csv, seed-sweep.png, seed-baselines.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
