"""How long a 50-point what-if sweep of the seed scenario takes (target: under 30 s on the
2-core development machine). Not a timed test: CPU speed varies; run it by hand.

    OMP_NUM_THREADS=1 python benchmarks/whatif_speed.py [--repeat 2] [--axis KEY=VALUES ...]

The sweep: GPT-13B -> GPT-1.3B on A100-80GB, 10 GPU counts x 5 teacher-output settings. The
second repeat shows what the planner's caches save when the same points are asked again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kdplan import whatif as w
from kdplan.jobs import load_job

JOB = str(Path(__file__).resolve().parent.parent / "examples" / "seed" / "job.toml")
AXES = ["gpus=1,2,4,8,16,24,32,40,48,56", "kd.compression=auto,dense,topk:64,topk:64:8,topk:16:4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="run the same sweep this many times")
    ap.add_argument("--axis", action="append", help="replace the default axes (sweep syntax), repeatable")
    args = ap.parse_args()
    base = w.Base(spec=load_job(JOB), job_path=JOB)
    axes = w.parse_sweep(args.axis or AXES)
    done_at: list[float] = []  # when each point finished

    def on_point(i, n, row):
        done_at.append(time.perf_counter())

    for rep in range(args.repeat):
        done_at.clear()
        t0, cpu0 = time.perf_counter(), time.process_time()
        res = w.run_sweep(base, axes, on_point=on_point)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        per = [b - a for a, b in zip([t0] + done_at, done_at)]
        ok = sum(r["feasible"] for r in res.rows)
        # CPU time too: on a shared machine the wall time says more about the neighbours
        print(f"run {rep + 1}: {len(res.rows)} points ({ok} feasible) in {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"({wall / len(res.rows) * 1000:.0f} ms/point, slowest point {max(per):.2f} s)")


if __name__ == "__main__":
    main()
