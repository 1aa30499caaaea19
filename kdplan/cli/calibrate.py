"""kdplan calibrate REPORT...: fit cost-model coefficients to measured runs."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(reports: Annotated[list[str], typer.Argument(help="Run reports (report.json).")]):
        """Fit compute efficiency, link efficiency/latency and step overhead to measured reports; write a calibrated profile."""
        run_cli(lambda: not_implemented("calibrate"))
