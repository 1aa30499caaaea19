"""kdplan's entry point: registers one sub-command per file."""

from __future__ import annotations

import sys
import warnings

import typer

from . import calibrate, inspect, plan, profile, run, schema, simulate, validate, whatif
from ..schema.cluster import DeprecatedField
from .common import OneLineUsageErrors

app = typer.Typer(
    name="kdplan",
    help="Plan, simulate and run knowledge distillation of LLMs on GPU clusters: does it fit, "
         "which layout, how long, how much, what if.\n\n"
         "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 infeasible (nothing fits).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=OneLineUsageErrors,
)

for module in (plan, inspect, simulate, whatif, profile, run, calibrate, validate, schema):
    module.register(app)


_show = warnings.showwarning


def _one_line(message, category, filename, lineno, file=None, line=None):
    """A deprecated profile key is the user's to fix: one line, no source location."""
    if issubclass(category, DeprecatedField):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _show(message, category, filename, lineno, file, line)


warnings.showwarning = _one_line


def main() -> None:
    app()


if __name__ == "__main__":
    main()
