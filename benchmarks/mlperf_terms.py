"""Where the MLPerf GPT-3 175B rows' error sits (issue 13): each row's predicted terms, and what the
measured rows themselves say about the per-micro-batch time and the fixed time of a step.

    python benchmarks/mlperf_terms.py

Per row: measured and predicted step time, the predicted compute, pipeline bubble, exposed
tensor-parallel and data-parallel (gradient reduce-scatter + weight all-gather) time. Then, for the
v3.1 NVIDIA rows that share one layout per GPU (tp4 pp8 v12, 8 and 16 micro-batches per pipeline),
a two-point fit of step = m * c + (p - 1) / v * c + F: the measured per-micro-batch time c and fixed
time F next to the predicted ones. Seconds to run (no GPU, no fit).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdplan.cost.compose import price_student  # noqa: E402
from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, run_case  # noqa: E402
from kdplan.schema.compression import Compression  # noqa: E402


def main() -> None:
    cases = [build_case(r) for r in read_rows(EXTRA_CSV) if r["source_id"].startswith("mlperf")]
    print(f"{'row':12s} {'m':>4s} {'meas s':>8s} {'pred s':>8s} {'error':>7s} {'compute':>8s} {'bubble':>7s} "
          f"{'tp exp':>7s} {'dp exp':>7s}")
    by_m: dict[int, list[tuple[float, float]]] = {}
    for c in cases:
        p = price_student(c.problem, c.layout, compression=Compression("dense"))
        r = run_case(c)
        tp = p.comm_exposed_s.get("tensor_parallel", 0.0)
        dp = p.comm_exposed_s.get("gradients", 0.0)
        print(f"{c.row['row_id']:12s} {p.num_micro_batches:4d} {c.measured_time_s:8.4f} {r.predicted_time_s:8.4f} "
              f"{r.time_error:+7.1%} {p.compute_s:8.4f} {p.bubble_s:7.4f} {tp:7.4f} {dp:7.4f}")
        if c.row["row_id"].startswith("MLP31-NV") and p.num_micro_batches in (8, 16):
            per_mb = (p.compute_s + tp) / p.num_micro_batches
            fixed = r.predicted_time_s - p.compute_s - tp - p.bubble_s
            by_m.setdefault(p.num_micro_batches, []).append((c.measured_time_s, per_mb, fixed, p.bubble_s / per_mb))
    if 8 in by_m and 16 in by_m:
        t8, t16 = statistics.median(x[0] for x in by_m[8]), statistics.median(x[0] for x in by_m[16])
        c_pred, f_pred, bub = by_m[8][0][1], by_m[8][0][2], by_m[8][0][3]
        c_meas = (t16 - t8) / 8
        f_meas = t8 - 8 * c_meas - bub * c_meas
        print(f"\nv3.1 NVIDIA rows, tp4 pp8 v12 (median of the 8- and 16-micro-batch rows: {t8:.4f} s, {t16:.4f} s):")
        print(f"  per micro-batch (stage compute + exposed TP): measured {c_meas * 1e3:.1f} ms, predicted "
              f"{c_pred * 1e3:.1f} ms ({c_pred / c_meas - 1:+.1%})")
        print(f"  fixed per step (exposed DP collectives, optimizer, loss): measured {f_meas:.3f} s, predicted {f_pred:.3f} s")


if __name__ == "__main__":
    main()
