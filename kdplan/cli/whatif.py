"""kdplan whatif: sweep inputs and tabulate / plot the best plan at each point."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import not_implemented, run_cli


def register(app: typer.Typer) -> None:
    @app.command("whatif")
    def whatif_cmd(job: Annotated[Optional[str], typer.Argument(help="Base job TOML (default: the seed scenario).")] = None,
                   sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="KEY=V1,V2,... axis, repeatable (gpus, cluster, intra_bw_scale, inter_bw_scale, seq_len, global_batch, teacher, student, kd.compression, kd.placement).")] = None):
        """Sweep GPU count, GPU type, bandwidth, sequence length, batch, models or compression; tabulate the best plan per point."""
        run_cli(lambda: not_implemented("whatif"))
