"""kdplan inspect PLAN: layouts, rank map, memory per GPU, time breakdown, alternatives, what binds."""

from __future__ import annotations

from typing import Annotated

import typer

from ..io import load_model
from ..schema import Plan
from .common import run_cli


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(plan: Annotated[str, typer.Argument(help="plan.json written by `kdplan plan`.")],
                    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False):
        """Show a plan: layouts, rank map, per-GPU memory, predicted time breakdown, alternatives, what binds."""
        def body():
            p = load_model(Plan, plan)
            if json_out:
                print(p.model_dump_json(indent=2))
                return
            from .render import render_plan
            render_plan(p)
        run_cli(body)
