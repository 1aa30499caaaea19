"""kdplan simulate PLAN: event simulation of one step (timeline, bubbles, utilization, trace)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate_cmd(plan: Annotated[str, typer.Argument(help="plan.json written by `kdplan plan`.")],
                     trace: Annotated[Optional[str], typer.Option("--trace", help="Write a Chrome/Perfetto trace-event JSON of the simulated step.")] = None):
        """Event-simulate one training step of a plan: timeline, bubbles, utilization; --trace writes a Perfetto trace."""
        run_cli(lambda: not_implemented("simulate"))
