"""How long a 50-point what-if sweep of the seed scenario takes (target: under 30 s on the
2-core development machine). Not a timed test: CPU speed varies; run it by hand.

    OMP_NUM_THREADS=1 python benchmarks/whatif_speed.py [--points 50] [--repeat 2]

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
    args = ap.parse_args()
    base = w.Base(spec=load_job(JOB), job_path=JOB)
    axes = w.parse_sweep(AXES)
    slowest: list[float] = []

    def on_point(i, n, row):
        slowest.append(time.perf_counter())

    for rep in range(args.repeat):
        slowest.clear()
        t0 = time.perf_counter()
        res = w.run_sweep(base, axes, on_point=on_point)
        wall = time.perf_counter() - t0
        per = [b - a for a, b in zip([t0] + slowest, slowest)]
        ok = sum(r["feasible"] for r in res.rows)
        print(f"run {rep + 1}: {len(res.rows)} points ({ok} feasible) in {wall:.2f} s "
              f"({wall / len(res.rows) * 1000:.0f} ms/point, slowest point {max(per):.2f} s)")


if __name__ == "__main__":
    main()
