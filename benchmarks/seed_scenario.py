"""The seed paper's comparison, predicted by kdplan's cost model: single-GPU KD, naive
data-parallel KD, mirror KD and kdplan's plan; step time, speedup, communication, utilization.

    python benchmarks/seed_scenario.py

Seed targets (issue 4): >= 25x faster than single-GPU KD on 32 GPUs, >= 50% less communication
than naive data-parallel KD, predicted MFU >= 50%. The last example is one where naive DP
cannot run at all (a 70B teacher beside an 8B student does not fit one 80 GB GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from kdplan.jobs import load_job, resolve  # noqa: E402
from kdplan.planner import make_plan  # noqa: E402
from kdplan.search.decode import layout_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOBS = ["examples/seed/job.toml", "examples/seed/job-2.7b.toml", "examples/llama-70b-8b/job.toml"]


def row(name, step, single, comm, util, mfu=None):
    sp = f"{single / step:8.1f}x" if (step and single) else f"{'-':>9}"
    st = f"{step:9.2f} s" if step else f"{'cannot run':>11}"
    cm = f"{comm / 1e9:10.1f} GB" if comm is not None else f"{'-':>13}"
    ut = f"{util:6.0%}" if util is not None else f"{'-':>6}"
    mf = f"{mfu:6.1%}" if mfu is not None else ""
    print(f"  {name:22} {st} {sp} {cm} {ut} {mf}")


def main() -> None:
    for job in JOBS:
        path = str(ROOT / job)
        p = resolve(load_job(path), job_path=path)
        plan = make_plan(p, top_k=0)
        pr, b = plan.prediction, plan.prediction.baselines
        single = b.single_gpu.step_time_s
        print(f"\n{p.teacher.name} -> {p.student.name} on {p.num_gpus} {p.cluster.groups[0].node.gpu} "
              f"({p.job.global_batch} x {p.job.seq_len} tokens per step)   [{job}]")
        print(f"  {'':22} {'step time':>11} {'speedup':>9} {'comm/step':>13} {'util':>6} {'MFU':>6}")
        row("single-GPU KD", single, single, b.single_gpu.comm_bytes_per_step, b.single_gpu.utilization)
        row("naive data-parallel KD", b.naive_dp.step_time_s, single, b.naive_dp.comm_bytes_per_step, b.naive_dp.utilization)
        row("mirror KD", b.mirror.step_time_s, single, b.mirror.comm_bytes_per_step, b.mirror.utilization)
        row("kdplan", pr.step_time_s, single, pr.comm_bytes_per_step, pr.utilization, pr.mfu)
        for name, bl in (("naive DP", b.naive_dp), ("mirror", b.mirror), ("single GPU", b.single_gpu)):
            if bl.step_time_s is None:
                print(f"  {name} cannot run: {bl.reason}")
        red = pr.comm_reduction_vs_naive_dp
        print(f"  plan: {plan.kd.placement}, {plan.kd.compression}; teacher {layout_summary(plan.teacher.layout)}; "
              f"student {layout_summary(plan.student.layout)}")
        ratio = lambda x, f: "n/a (baseline cannot run)" if x is None else f"{x:{f}}x"  # noqa: E731
        print(f"  vs single GPU {ratio(pr.speedup_vs_single_gpu, '.1f')}, vs mirror {ratio(pr.speedup_vs_mirror, '.2f')}, "
              "communication vs naive DP " + (f"{-red:+.0%}" if red is not None else "n/a (naive DP cannot run)"))


if __name__ == "__main__":
    main()
