"""kdplan run PLAN: launch the executor with torchrun."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(plan: Annotated[str, typer.Argument(help="plan.json written by `kdplan plan`.")],
                steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
                report: Annotated[Optional[str], typer.Option("--report", help="Write the run report here.")] = None):
        """Run a plan with torchrun (or print the torchrun / Slurm command) and write a run report."""
        run_cli(lambda: not_implemented("run"))
