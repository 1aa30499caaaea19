"""Per-row memory of the published runs, by component: what each term predicts next to what was measured.

    python benchmarks/memory_rows.py [--source flagperf_baai] [--left-out] [--out FILE]

For every row of one source (kdplan/data/published_runs_*.csv) that measured memory per GPU: the
layout priced, the measured and predicted GiB, the error, and the predicted terms of the fullest
GPU (weights, gradients, optimizer, optimizer step, gathered ZeRO-3 blocks,
activations, logits, fragmentation, framework). ``--left-out`` prices the rows with the constants
fitted on every other source (kdplan/cost/fit.py, as ``kdplan validate --leave-one-source-out``
does for its "memory left out" column); otherwise with the shipped profiles (the fit residual).

Last line: ``<source> memory: median |error| X% over N rows (in-sample | left out)``.

``--surplus RUNTIME`` then fits the rows' surplus (measured - predicted) of one runtime (e.g.
selene-a100-80g: FlagPerf's Megatron-core / FlagScale rows) by least squares on candidate terms,
one line per candidate set: the coefficients, the median and largest |error| left, and the rows
that the fitted surplus would put over their GPU's memory (a layout that ran must fit). Features:
``P`` parameters on the fullest GPU (G, so a coefficient is bytes per parameter), ``Pu`` the
parameters it updates (ZeRO-sharded), ``act`` its activations (GiB), ``act_tp1`` the same on
rows without tensor parallelism, ``groups`` its parallel groups of more than one GPU (tp, dp,
pp: each holds its own NCCL communicator and buffers), ``c`` a constant (GiB).
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
    ap.add_argument("--surplus", metavar="RUNTIME", help="least-squares fits of this runtime's surplus")
    args = ap.parse_args()

    cases = [build_case(r) for p in ALL_CSVS for r in read_rows(p)]
    held = [c for c in cases if c.row["source_id"] == args.source]
    if not held:
        sys.exit(f"no rows of source {args.source!r}")
    if args.left_out:
        values = F.fit([c for c in cases if c.row["source_id"] != args.source] + F.block_cases()).values
        held = [F.apply(c, values) if not c.skip else c for c in held]
    lines, errors, feats = [], [], []
    for c in held:
        if c.skip or c.measured_memory_gib is None or c.oom:
            continue
        p = price_student(c.problem, c.layout, compression=Compression("dense"))
        lay, meas = c.layout, c.measured_memory_gib
        err = (p.memory_gib - meas) / meas
        errors.append(abs(err))
        if c.runtime == args.surplus and c.problem.job.precision != "fp32":
            feats.append(_features(c, p))
        terms = " ".join(f"{SHORT.get(k, k)}={v:.1f}" for k, v in p.memory_terms_gib.items())
        lines.append(f"{c.row['row_id']:18s} {c.runtime:18s} tp{lay.tp} pp{lay.pp} dp{lay.dp} mb{lay.micro_batch} "
                     f"z{lay.zero} {lay.recompute:9s} sp{int(lay.sequence_parallel)} meas {meas:6.2f} pred {p.memory_gib:6.2f} "
                     f"{err:+6.1%} stage {p.fullest_stage} | {terms}")
    lines.append(f"{args.source} memory: median |error| {statistics.median(errors):.1%} over {len(errors)} rows "
                 f"({'left out' if args.left_out else 'in-sample'})")
    if args.surplus:
        lines += surplus_fits(feats, args.surplus)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _features(case, price) -> dict:
    """One row's candidate terms (see the module docstring) and its measured / predicted GiB."""
    t, lay = price.memory_terms_gib, case.layout
    # In Gi-parameters (GiB / bytes each), so that a fitted coefficient reads as bytes per parameter:
    # 16-bit weights (the 16-bit rows only) and 12 B of Adam state per updated parameter.
    params, updated = t.get("weights", 0.0) / 2.0, t.get("optimizer", 0.0) / 12.0
    act = t.get("activations", 0.0)
    return {"row": case.row["row_id"], "meas": case.measured_memory_gib, "pred": price.memory_gib,
            "limit": case.problem.cluster.gpu_of_group(0).memory_gib,
            "P": params, "Pu": updated, "act": act, "act_tp1": act if lay.tp == 1 else 0.0,
            "groups": float(sum(n > 1 for n in (lay.tp, lay.dp, lay.pp))), "c": 1.0}


CANDIDATES = (("c",), ("P", "Pu"), ("P", "Pu", "c"), ("groups",), ("groups", "c"), ("P", "Pu", "act"),
              ("P", "Pu", "act", "c"), ("P", "Pu", "act_tp1"), ("P", "Pu", "groups"))


def surplus_fits(feats: list[dict], runtime: str) -> list[str]:
    """Least squares of measured - predicted on each candidate set of terms (numpy, no torch)."""
    import numpy as np

    if len(feats) < 4:
        return [f"{runtime}: {len(feats)} 16-bit rows with memory, too few to fit"]
    y = np.array([f["meas"] - f["pred"] for f in feats])
    out = [f"surplus of {runtime} over {len(feats)} 16-bit rows (GiB; P, Pu in Gi-parameters: a coefficient is bytes per parameter)"]
    for names in CANDIDATES:
        X = np.array([[f[n] for n in names] for f in feats])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        fitted = X @ coef
        rel = [abs(f["pred"] + g - f["meas"]) / f["meas"] for f, g in zip(feats, fitted)]
        over = [f["row"] for f, g in zip(feats, fitted) if f["pred"] + g > f["limit"]]
        terms = " ".join(f"{n}={c:+.2f}" for n, c in zip(names, coef))
        out.append(f"  {terms:44s} median |error| {statistics.median(rel):5.1%} max {max(rel):5.1%}"
                   f" out of memory: {', '.join(over) or 'none'}")
    return out


if __name__ == "__main__":
    main()
