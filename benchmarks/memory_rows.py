"""Per-row memory of the published runs, by component: what each term predicts next to what was measured.

    python benchmarks/memory_rows.py [--source flagperf_baai] [--left-out] [--out FILE]

For every row of one source (kdplan/data/published_runs_*.csv) that measured memory per GPU: the
layout priced, the measured and predicted GiB, the error, and the predicted terms of the fullest
GPU (weights, gradients, optimizer, optimizer step, gathered ZeRO-3 blocks,
activations, logits, fragmentation, framework). ``--left-out`` prices the rows with the constants
fitted on every other source (kdplan/cost/fit.py, as ``kdplan validate --leave-one-source-out``
does for its "memory left out" column); otherwise with the shipped profiles (the fit residual).

Last line: ``<source> memory: median |error| X% over N rows (in-sample | left out)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdplan.cost import fit as F  # noqa: E402
from kdplan.cost.compose import price_student  # noqa: E402
from kdplan.cost.validate import ALL_CSVS, build_case, read_rows  # noqa: E402
from kdplan.schema.compression import Compression  # noqa: E402

SHORT = {"weights": "w", "gradients": "g", "optimizer": "opt", "optimizer_step": "step",
         "gathered_params": "gath", "unsharded_grads": "ugrad",
         "activations": "act", "logits": "logits", "kd_buffers": "kd", "fragmentation": "frag",
         "framework": "fw"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="flagperf_baai")
    ap.add_argument("--left-out", action="store_true", help="fit on every other source first")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()

    cases = [build_case(r) for p in ALL_CSVS for r in read_rows(p)]
    held = [c for c in cases if c.row["source_id"] == args.source]
    if not held:
        sys.exit(f"no rows of source {args.source!r}")
    if args.left_out:
        values = F.fit([c for c in cases if c.row["source_id"] != args.source] + F.block_cases()).values
        held = [F.apply(c, values) if not c.skip else c for c in held]
    lines, errors = [], []
    for c in held:
        if c.skip or c.measured_memory_gib is None or c.oom:
            continue
        p = price_student(c.problem, c.layout, compression=Compression("dense"))
        lay, meas = c.layout, c.measured_memory_gib
        err = (p.memory_gib - meas) / meas
        errors.append(abs(err))
        terms = " ".join(f"{SHORT.get(k, k)}={v:.1f}" for k, v in p.memory_terms_gib.items())
        lines.append(f"{c.row['row_id']:18s} {c.runtime:18s} tp{lay.tp} pp{lay.pp} dp{lay.dp} mb{lay.micro_batch} "
                     f"z{lay.zero} {lay.recompute:9s} sp{int(lay.sequence_parallel)} meas {meas:6.2f} pred {p.memory_gib:6.2f} "
                     f"{err:+6.1%} stage {p.fullest_stage} | {terms}")
    lines.append(f"{args.source} memory: median |error| {statistics.median(errors):.1%} over {len(errors)} rows "
                 f"({'left out' if args.left_out else 'in-sample'})")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
