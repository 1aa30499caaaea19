"""kdplan profile: measure this machine or cluster and write a cluster profile."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(output: Annotated[Optional[str], typer.Option("-o", "--output", help="Cluster profile YAML to write.")] = None,
                    quick: Annotated[bool, typer.Option("--quick", help="Finish in under a minute.")] = False):
        """Measure compute per layer shape, memory and collectives per link tier; write a cluster profile YAML."""
        run_cli(lambda: not_implemented("profile"))
