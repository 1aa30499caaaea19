"""Pricing and plan-simulation speed (moved here from tests/test_cost_roles.py and
tests/test_sim_plan.py, which now count the mechanisms instead: cache hits, calls, events).
A benchmark that prints, not a timed test. Targets (2-core machine, CPU time, best of three):
a fresh role price <= 1 ms, a cached one <= 50 us, a 1,024-GPU plan simulated and traced <= 1.5 s.

    python benchmarks/pricing_speed.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kdplan.cost import price_student  # noqa: E402
from kdplan.jobs import JobSpec, resolve  # noqa: E402
from kdplan.schema.compression import Compression  # noqa: E402
from kdplan.schema.plan import Layout  # noqa: E402
from kdplan.sim.plan_sim import write_trace  # noqa: E402


def _lay(tp, pp, dp, b):
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch=b, num_gpus=tp * pp * dp)


def pricing() -> None:
    lays = [_lay(t, p, 32 // (t * p), b) for t in (1, 2, 4, 8) for p in (1, 2, 4) for b in (1, 2, 4)]
    dense = Compression("dense")
    first = again = float("inf")
    for _ in range(3):
        fresh = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=32,
                                global_batch=512))
        t0 = time.process_time()
        for x in lays:
            price_student(fresh, x, compression=dense)
        t1 = time.process_time()
        for x in lays:
            price_student(fresh, x, compression=dense)
        t2 = time.process_time()
        first, again = min(first, (t1 - t0) / len(lays)), min(again, (t2 - t1) / len(lays))
    print(f"role price, fresh problem : {first * 1e6:8.1f} us  (target <= 1000 us) {'ok' if first <= 1e-3 else 'SLOW'}")
    print(f"role price, cached        : {again * 1e6:8.1f} us  (target <= 50 us)   {'ok' if again <= 50e-6 else 'SLOW'}")
    print(f"fresh / cached            : {first / max(again, 1e-9):8.0f} x")


def simulation() -> None:
    from test_sim_plan import _big_plan
    best = {}
    for scale in (8, 1):
        plan = _big_plan(dp_scale=scale)
        for _ in range(3):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.process_time()
                write_trace(plan, Path(d) / "t.json")
                best[scale] = min(best.get(scale, float("inf")), time.process_time() - t0)
    print(f"simulate + trace,  128 GPUs: {best[8]:6.3f} s")
    print(f"simulate + trace, 1024 GPUs: {best[1]:6.3f} s  (target <= 1.5 s) {'ok' if best[1] <= 1.5 else 'SLOW'};"
          f" 1024 / 128 GPUs = {best[1] / best[8]:.2f} x (one replica per role: ~1)")


if __name__ == "__main__":
    pricing()
    simulation()
