"""kdplan calibrate REPORT...: fit cost-model coefficients to measured runs."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import err, out, run_cli


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        reports: Annotated[list[str], typer.Argument(help="Run reports (report.json) written by `kdplan run`.")],
        cluster: Annotated[Optional[str], typer.Option("--cluster", help="Cluster preset or YAML to calibrate (default: the first report's plan's cluster).")] = None,
        output: Annotated[str, typer.Option("-o", "--output", help="Calibrated cluster profile YAML to write.")] = "calibrated.yaml",
        no_memory: Annotated[bool, typer.Option("--no-memory", help="Fit step time only; keep the memory overheads.")] = False,
        tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, max=1.0, help="Relative error treated as measurement noise: no report's error may grow beyond max(its error before, this). 0 = no report may get worse.")] = 0.10,
    ):
        """Fit compute efficiency, link efficiency/latency and step overhead to measured reports; write a calibrated profile."""
        run_cli(_calibrate, reports, cluster, output, not no_memory, tolerance)


def _calibrate(reports: list[str], cluster_name: str | None, output: str, fit_memory: bool,
               tolerance: float = 0.10) -> None:
    from ..calibrate.calibrate import calibrate, calibrated_file, load_case, rel_err
    from ..calibrate.profile import dump_yaml
    from ..io import write_atomic
    from ..profiles import load_cluster

    cases = [load_case(r) for r in reports]
    name = cluster_name or cases[0].plan.job.cluster
    cluster = load_cluster(name)
    result = calibrate(cases, cluster, fit_memory=fit_memory, tolerance=tolerance)
    cf = calibrated_file(result, cases, command=shlex.join(["kdplan", *sys.argv[1:]]), source=name)
    write_atomic(output, dump_yaml(cf))

    out.print(f"calibration of {name} on {len(cases)} report(s): step time (s) and peak memory (GiB), "
              "measured vs predicted before -> after")
    for c, b, a in zip(cases, result.before, result.after):
        out.print(f"  {c.path}: step measured {c.measured_step_s:.4g}, predicted before {b[0]:.4g} "
                  f"({rel_err(b[0], c.measured_step_s):.1%}), after {a[0]:.4g} ({rel_err(a[0], c.measured_step_s):.1%}); "
                  f"memory measured {c.measured_memory_gib:.3g}, before {b[1]:.3g} "
                  f"({rel_err(b[1], c.measured_memory_gib):.1%}), after {a[1]:.3g} ({rel_err(a[1], c.measured_memory_gib):.1%})",
                  soft_wrap=True)
    for c, b in zip(cases, result.before):
        if c.reported_step_s and rel_err(b[0], c.reported_step_s) > 0.01:
            err.print(f"note: {c.path}: re-priced step {b[0]:.4g} s differs from the plan's own prediction "
                      f"{c.reported_step_s:.4g} s (different profile, or a setting the plan does not record)")
    for n, (old, new) in result.changed.items():
        out.print(f"  {n}: {old:.4g} -> {new:.4g}")
    kept = ", ".join(f"{t} {f:.0%}" for t, f in result.guard_step.items())
    out.print(f"wrote {escape(str(output))} (fitted move kept: {kept})")
