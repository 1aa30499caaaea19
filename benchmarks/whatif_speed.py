"""How long a 50-point what-if sweep of the seed scenario takes (target: under 30 s on the
2-core development machine). Not a timed test: CPU speed varies; run it by hand.

    OMP_NUM_THREADS=1 python benchmarks/whatif_speed.py [--repeat 2] [--no-baseline] [--axis KEY=VALUES ...]

The sweep: GPT-13B -> GPT-1.3B on A100-80GB, 10 GPU counts x 5 teacher-output settings. Each run
uses a fresh planner (nothing cached from an earlier run). The baseline run, in the same
process, plans with the reuse across GPU counts turned off (``Planner._share_prices``: role
prices and layout lists shared between problems that differ only in GPU count), which is how
the planner ran before it; points that differ only in pins still share their prices in both.
A repeat with the same planner shows what the finished-plan cache saves when the same points
are asked again. The machine's load average is printed with every run: other processes on a
shared machine inflate the wall time (and, less, the CPU time).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kdplan import whatif as w
from kdplan.jobs import load_job
from kdplan.planner import Planner

JOB = str(Path(__file__).resolve().parent.parent / "examples" / "seed" / "job.toml")
AXES = ["gpus=1,2,4,8,16,24,32,40,48,56", "kd.compression=auto,dense,topk:64,topk:64:8,topk:16:4"]


class NoSharingAcrossSizes(Planner):
    """The planner without the reuse across GPU counts (the baseline)."""

    def _share_prices(self, problem):
        return problem


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(label: str, base, axes, planner: Planner) -> tuple[float, float, list[dict]]:
    done_at: list[float] = []  # when each point finished
    load0 = loadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    res = w.run_sweep(base, axes, plan_fn=lambda p: planner.plan(p, top_k=0),
                      on_point=lambda i, n, row: done_at.append(time.perf_counter()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    per = [b - a for a, b in zip([t0] + done_at, done_at)]
    ok = sum(r["feasible"] for r in res.rows)
    print(f"{label}: {len(res.rows)} points ({ok} feasible) in {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"({wall / len(res.rows) * 1000:.0f} ms/point, slowest point {max(per):.2f} s); "
          f"load average {load0} -> {loadavg()} on {os.cpu_count()} CPUs", flush=True)
    return wall, cpu, res.rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="run the same sweep this many times (same planner)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline run without reuse across GPU counts")
    ap.add_argument("--axis", action="append", help="replace the default axes (sweep syntax), repeatable")
    args = ap.parse_args()
    base = w.Base(spec=load_job(JOB), job_path=JOB)
    axes = w.parse_sweep(args.axis or AXES)
    if not args.no_baseline:
        bw, bc, brows = timed("baseline (no reuse across GPU counts)", base, axes, NoSharingAcrossSizes())
    planner = Planner()
    for rep in range(args.repeat):
        wall, cpu, rows = timed(f"run {rep + 1}", base, axes, planner)
        if rep == 0 and not args.no_baseline:
            same = all(a.get("step_time_s") == b.get("step_time_s") and a.get("plan.student") == b.get("plan.student")
                       and a.get("plan.teacher") == b.get("plan.teacher") for a, b in zip(rows, brows))
            print(f"  vs baseline: {bw / wall:.2f}x wall, {bc / cpu:.2f}x CPU; "
                  f"same plans and step times at every point: {same}")


if __name__ == "__main__":
    main()
