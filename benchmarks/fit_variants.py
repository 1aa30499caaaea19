"""Refit the cost model with one change to its fitted constants and print every source's error,
in-sample and (--loo) left out: the experiments behind issue 13's trade-off between a source's fit
residual and the other sources' errors when they are left out.

    python benchmarks/fit_variants.py                       # the shipped PARAMS (kdplan validate --fit)
    python benchmarks/fit_variants.py a100_ceiling=0.76     # the A100 GEMM ceiling held at 0.76
    python benchmarks/fit_variants.py fms_network --loo     # + leave-one-source-out (~2.5 min)

Variants (one per run; kdplan/cost/fit.py PARAMS is never modified):
  a100_ceiling=X       a100.max_fraction held at X, everything else refitted
  fms_network          the inter-node share of the dgx-a100-80g rows fitted (only fms-fsdp's A100 rows
                       cross nodes there: HSDP's gradient all-reduce over its 400 Gb/s network)
  megatron_block_cost  a fixed cost per block per micro-batch for Megatron-LM (selene-a100-80g)
  h100_attention       h100.attention_fraction fitted (prior 1.0, spread 1.5, as a100's)
  fsdp_block_cost      a fixed cost per block per micro-batch for the PyTorch runtimes (dgx-* clusters:
                       fms-fsdp, OLMo-core and the MLPerf rows that borrow dgx-h100)
  fsdp_stack_cost      the same for the PyTorch FSDP stacks only (fms-fsdp, OLMo-core: their rows'
                       runtime renamed "pytorch-fsdp" in this script)
Output: the fitted values, then per source "name=in-sample% (/m memory%)", with --loo one line per
source: its error in-sample and when left out. Deterministic (the fit is a coordinate search).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from kdplan.cost import fit as F
from kdplan.cost.validate import ALL_CSVS, build_case, read_rows

FSDP_SOURCES = ("fms_fsdp_ibm", "olmo_core_readme")
PYTORCH_CLUSTERS = ("dgx-a100-80g", "dgx-a100-40g", "dgx-a800", "dgx-h100", "dgx-h200", "dgx-h800")


def variant_params(name: str) -> tuple[F.Param, ...]:
    params = list(F.PARAMS)
    key, _, value = name.partition("=")
    if key == "baseline":
        pass
    elif key == "a100_ceiling":
        v = float(value)
        params = [dataclasses.replace(p, prior=v, lo=v, hi=v, spread=0.0) if p.name == "a100.max_fraction" else p
                  for p in params]
    elif key == "fms_network":
        params.insert(0, F.Param("fms.inter_node_efficiency", "inter_node", "efficiency", ("dgx-a100-80g",),
                                 0.85, 0.05, 1.0, log=True, why="achieved share of fms-fsdp's A100 network"))
    elif key == "megatron_block_cost":
        params.insert(0, F.Param("megatron.layer_overhead_s", "overheads", "layer_overhead_s", ("selene-a100-80g",),
                                 0.0, 0.0, 0.03, why="Megatron-LM's fixed cost per block per micro-batch"))
    elif key == "h100_attention":
        i = [p.name for p in params].index("h100.max_fraction")
        params.insert(i, F.Param("h100.attention_fraction", "gpu", "attention_fraction", F.GPU_H100, 1.0, 0.1, 1.0,
                                 why="as a100.attention_fraction", spread=1.5))
    elif key == "fsdp_block_cost":
        params.insert(0, F.Param("pytorch.layer_overhead_s", "overheads", "layer_overhead_s", PYTORCH_CLUSTERS,
                                 0.0, 0.0, 0.03, why="PyTorch runtimes' fixed cost per block per micro-batch"))
    elif key == "fsdp_stack_cost":
        params.insert(0, F.Param("fsdp.layer_overhead_s", "overheads", "layer_overhead_s", ("pytorch-fsdp",),
                                 0.0, 0.0, 0.03, why="PyTorch FSDP stacks' fixed cost per block per micro-batch"))
    else:
        raise SystemExit(f"error: unknown variant {name!r} (see --help)")
    return tuple(params)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", nargs="?", default="baseline")
    ap.add_argument("--loo", action="store_true", help="also fit with each source left out")
    a = ap.parse_args(argv)
    params = variant_params(a.variant)
    cases = [build_case(r) for path in ALL_CSVS for r in read_rows(path)] + F.block_cases()
    if a.variant == "fsdp_stack_cost":
        cases = [dataclasses.replace(c, runtime="pytorch-fsdp") if c.row["source_id"] in FSDP_SOURCES else c
                 for c in cases]
    t0 = time.time()
    if a.loo:
        full, outs = F.leave_one_source_out(cases, params)
    else:
        full, outs = F.fit(cases, params), []
    print(f"variant {a.variant}: objective {full.objective:.4f} ({time.time() - t0:.0f} s)")
    print("fitted: " + ", ".join(f"{k} {v:.4g}" for k, v in full.values.items()))
    errors = F.source_errors(F.price_with(cases, full.values, params))
    print("in-sample median |error| %: " + " ".join(
        f"{s}={_pct(t)}" + (f"/m{_pct(m)}" if m is not None else "") for s, (t, m) in errors.items() if t is not None))
    for o in outs:
        print(f"  {o.source:20s} time in {_pct(o.in_sample[0]):>5s} left out {_pct(o.left_out[0]):>5s}"
              + (f"   memory in {_pct(o.in_sample[1])} left out {_pct(o.left_out[1])}" if o.left_out[1] is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
