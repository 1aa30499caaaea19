"""kdplan schema: print the JSON Schema of a file format."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import InputError
from ..schema import ClusterFile, HardwareFile, JobSpec, Plan, RunReport
from .common import run_cli

SCHEMAS = {"plan": Plan, "job": JobSpec, "report": RunReport, "cluster": ClusterFile,
           "hardware": HardwareFile}


def json_schema(kind: str) -> dict:
    if kind not in SCHEMAS:
        raise InputError(f"unknown schema {kind!r}; choose one of {', '.join(SCHEMAS)}")
    return SCHEMAS[kind].model_json_schema()


def register(app: typer.Typer) -> None:
    @app.command("schema")
    def schema_cmd(kind: Annotated[str, typer.Argument(help="plan | job | report | cluster | hardware")]):
        """Print the JSON Schema of a kdplan file format (plan, job, report, cluster, hardware)."""
        run_cli(lambda: print(json.dumps(json_schema(kind), indent=2, sort_keys=True)))
