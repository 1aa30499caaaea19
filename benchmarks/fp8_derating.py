"""The fp8 training GEMM derating each published fp8 recipe implies (Overheads.fp8_training_derating).

    python benchmarks/fp8_derating.py

For each pair of published runs that differ only in fp8 (same source, model, layout and GPUs:
FlagPerf's Megatron-Core + Transformer Engine Llama-3-8B rows, OLMo-core's torchao float8 rows),
the derating at which the cost model's bf16 / fp8 step-time ratio equals the measured one. The
ratio cancels what the bf16 model gets wrong about the pair (both rows share it), so what is left
is the fp8 GEMMs' speed. Prints one line per pair, then the median per recipe; the Transformer
Engine median is what kdplan.cost.validate's RUNTIME_SETTINGS gives rows naming Transformer Engine.
Seconds to run (no GPU, no fit).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, run_case  # noqa: E402

PAIRS = {  # (bf16 row, fp8 row) per recipe
    "transformer_engine": [("FLAG-L3-8B-02", "FLAG-L3-8B-03"), ("FLAG-L3-8B-04", "FLAG-L3-8B-05")],
    "torchao_float8": [("OLMOC-01", "OLMOC-02"), ("OLMOC-03", "OLMOC-04"), ("OLMOC-05", "OLMOC-06"),
                       ("OLMOC-07", "OLMOC-08")],
}


def with_derating(case, d: float):
    cl = case.problem.cluster
    ov = cl.overheads.model_copy(update={"fp8_training_derating": d})
    return dataclasses.replace(case, problem=dataclasses.replace(case.problem, cluster=cl.model_copy(update={"overheads": ov})))


def implied(bf16_row: dict, fp8_row: dict) -> tuple[float, float, float]:
    """(measured bf16/fp8 ratio, predicted ratio at the case's own derating, implied derating)."""
    a, b = build_case(bf16_row), build_case(fp8_row)
    ta = run_case(a)
    measured = ta.measured_time_s / run_case(b).measured_time_s
    own = ta.predicted_time_s / run_case(b).predicted_time_s
    lo, hi = 0.3, 1.0
    for _ in range(40):  # the predicted ratio grows with the derating
        mid = (lo + hi) / 2
        if ta.predicted_time_s / run_case(with_derating(b, mid)).predicted_time_s < measured:
            lo = mid
        else:
            hi = mid
    return measured, own, (lo + hi) / 2


def main() -> None:
    rows = {r["row_id"]: r for r in read_rows(EXTRA_CSV)}
    for recipe, pairs in PAIRS.items():
        got = []
        for x, y in pairs:
            measured, own, d = implied(rows[x], rows[y])
            got.append(d)
            print(f"{recipe:18s} {x}/{y}: measured bf16/fp8 {measured:.3f}, predicted {own:.3f}, implied derating {d:.3f}")
        print(f"{recipe:18s} median implied derating {statistics.median(got):.3f} over {len(got)} pairs")


if __name__ == "__main__":
    main()
