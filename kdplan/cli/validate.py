"""kdplan validate: compare predictions with published and measured runs."""

from __future__ import annotations

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate_cmd():
        """Compare the cost model's predictions with published runs (and your run reports); print the error per source."""
        run_cli(lambda: not_implemented("validate"))
