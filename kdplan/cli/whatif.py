"""kdplan whatif: sweep inputs and tabulate / plot the best plan at each point."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from .common import (BatchOpt, DatasetTokensOpt, ClusterOpt, FixOpt, GpusOpt, JobArg, MinTopkOpt, ObjectiveOpt, PrecOpt,
                     SeqOpt, StudentOpt, TeacherOpt, TokensOpt, err, out, problem_from_flags, run_cli)

SWEEP_HELP = ("KEY=VALUES axis, repeatable; points are the cartesian product. Keys: gpus, cluster, gpu, "
              "intra_bw_scale, inter_bw_scale, seq_len, global_batch, teacher, student, and every --fix key "
              "(kd.compression, kd.placement, kd.mode, student.tp, ...; 'auto' lets the solver choose). "
              "Whole jobs (with --tokens; columns whole_job.*): students (several joined by '+', e.g. "
              "students=gpt-1.3b,gpt-1.3b+gpt-2.7b), dataset_tokens (unique tokens: epochs = tokens / "
              "dataset_tokens), storage_bw_scale and storage_capacity_scale (multiply every storage tier's "
              "read/write bandwidth or capacity). "
              "VALUES: 8,16,32 | 8..64x2 (geometric) | 8..64+8 (arithmetic) | 1,2,4,...,64.")


def register(app: typer.Typer) -> None:
    @app.command("whatif")
    def whatif_cmd(job: JobArg = None, teacher: TeacherOpt = None, student: StudentOpt = None,
                   cluster: ClusterOpt = None, gpus: GpusOpt = None, seq_len: SeqOpt = None,
                   global_batch: BatchOpt = None, precision: PrecOpt = None, fix: FixOpt = None,
                   min_topk: MinTopkOpt = None, objective: ObjectiveOpt = None, tokens: TokensOpt = None,
                   dataset_tokens: DatasetTokensOpt = None,
                   sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help=SWEEP_HELP, show_default=False)] = None,
                   csv: Annotated[Optional[str], typer.Option("--csv", help="Write one row per point (every prediction field) as CSV.", show_default=False)] = None,
                   parquet: Annotated[Optional[str], typer.Option("--parquet", help="The same table as Parquet.", show_default=False)] = None,
                   plot: Annotated[Optional[str], typer.Option("--plot", help="Draw throughput, efficiency, speedup, breakdown, memory and communication to a PNG.", show_default=False)] = None,
                   price: Annotated[Optional[float], typer.Option("--price-per-gpu-hour", help="US dollars per GPU-hour for every GPU (default: the profile's price_per_hour_usd).", show_default=False)] = None,
                   trace_dir: Annotated[Optional[str], typer.Option("--trace-dir", help="Write one Chrome/Perfetto trace per feasible point into this folder.", show_default=False)] = None,
                   json_out: Annotated[bool, typer.Option("--json", help="Print the rows as a JSON list on stdout and nothing else.")] = False):
        """Sweep GPU count, GPU type, bandwidth, sequence length, batch, models, compression or placement, and for whole jobs the students, dataset tokens and storage bandwidth / capacity; plan each point and tabulate / plot the best plan."""
        def body():
            from .. import whatif as w
            axes = w.parse_sweep(sweep or [])
            _check_outputs(csv=csv, parquet=parquet, plot=plot)  # fail before minutes of planning
            if price is not None and not (price >= 0 and math.isfinite(price)):
                raise InputError(f"--price-per-gpu-hour {price}: must be a non-negative number")
            # Resolve the base once so a bad base job fails fast with exit 2, before any planning.
            problem = problem_from_flags(job, teacher=teacher, student=student, cluster=cluster, gpus=gpus,
                                         seq_len=seq_len, global_batch=global_batch, precision=precision,
                                         fix=fix, min_topk=min_topk, objective=objective, tokens=tokens,
                                         dataset_tokens=dataset_tokens)
            base = w.Base(spec=problem.job, pins=list(fix or []), job_path=job)
            if trace_dir:
                try:
                    Path(trace_dir).mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise InputError(f"--trace-dir {trace_dir}: cannot create it ({e.strerror or e})") from None
            with _stdout_to_stderr():
                result = w.run_sweep(base, axes, tokens=tokens, price_per_gpu_hour=price, trace_dir=trace_dir,
                                     on_point=None if json_out else _progress)
            if csv or parquet:
                df = result.frame()
                if csv:
                    _write(csv, lambda p: df.to_csv(p, index=False))
                if parquet:
                    _write(parquet, lambda p: df.to_parquet(p, index=False))
            if plot:
                from ..plots import plot_sweep
                _write(plot, lambda p: plot_sweep(result.rows, axes, p, _title(problem, axes)))
            if json_out:
                print(json.dumps(result.rows, default=str, allow_nan=False))
                return
            _render(result, axes, problem)
            n_ok = sum(r["feasible"] for r in result.rows)
            err.print(f"{len(result.rows)} points ({n_ok} feasible) planned in {result.wall_s:.1f} s")
            if trace_dir:
                done = [r["trace"] for r in result.rows if r["trace"] and not r["trace"].startswith("skipped")]
                skipped = sorted({r["trace"] for r in result.rows if r["trace"] and r["trace"].startswith("skipped")})
                err.print(f"{len(done)} traces in {escape(str(trace_dir))} (open in https://ui.perfetto.dev)"
                          + "".join(f"; {s}" for s in skipped))
        run_cli(body)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Results own stdout; anything a solver library prints while planning (HiGHS writes a
    banner from C) is a diagnostic, so send file descriptor 1 to stderr until planning ends."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _check_outputs(**paths: str | None) -> None:
    for flag, path in paths.items():
        if path is None:
            continue
        p = Path(path)
        if not p.parent.is_dir():
            raise InputError(f"--{flag} {path}: folder {p.parent} does not exist")
        if flag == "plot" and p.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise InputError(f"--plot {path}: give a .png (or .svg, .pdf) file name")


def _write(path: str, fn) -> None:
    """Write through a temporary file (mode 0644) so a failed write never leaves half a file
    behind; a special file (/dev/null, a FIFO) is written into, never renamed over."""
    p = Path(path)
    if not p.parent.exists():
        raise InputError(f"{path}: folder {p.parent} does not exist")
    if p.exists() and p.is_dir():
        raise InputError(f"{path}: is a directory, expected a file name")
    special = p.exists() and not stat.S_ISREG(p.stat().st_mode)
    tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
    try:
        fn(str(tmp))
        os.chmod(tmp, 0o644)
        if special:
            with open(tmp, "rb") as src, open(p, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.unlink()
        else:
            tmp.replace(p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    except ImportError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: {e}") from None


def _progress(i: int, n: int, row: dict) -> None:
    if err.is_terminal:
        err.print(f"[dim]point {i + 1}/{n}[/]", end="\r")


def _title(problem, axes) -> str:
    j = problem.job
    pair = f"{j.teacher or 'no teacher'} -> {j.student}"
    swept = "; ".join(f"{a.key} = {', '.join(a.labels)}" if len(a.labels) <= 8 else
                      f"{a.key} = {a.labels[0]} .. {a.labels[-1]} ({len(a.labels)} values)" for a in axes)
    return (f"kdplan what-if: {pair} on {j.cluster}, seq {j.seq_len}, batch {j.global_batch}, {j.precision}"
            + (f"\nsweep: {swept}" if swept else ""))


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


ARRANGEMENT_CELL = {"one_after_another": "one after another", "side_by_side": "side by side",
                   "in_turn_each_step": "in turn"}


def job_strategy_cell(row: dict) -> str:
    """A whole-job row's strategy for the table: the strategy, how the students share the GPUs,
    and the cache's format and storage when it has one."""
    s = row.get("whole_job.strategy")
    if s is None:
        return "-"
    a = row.get("whole_job.students_arrangement")
    bits = [ARRANGEMENT_CELL.get(a, a)] if a else []
    if row.get("whole_job.cache_format"):
        bits.append(f"{row['whole_job.cache_format']} on {row.get('whole_job.cache_storage')}")
    return s + (f" ({', '.join(bits)})" if bits else "")


def _render(result, axes, problem) -> None:
    rows = result.rows
    show_budget = any(r.get("budget.total_hours") is not None for r in rows)
    show_job = any(r.get("whole_job.strategy") is not None for r in rows)  # a whole-job sweep (--tokens)
    t = Table(title=_title(problem, axes), title_justify="left")
    for a in axes:
        t.add_column(a.key, style="bold")
    for c in ("GPUs", "tokens/s", "step s", "MFU", "mem GiB", "GB/step", "speedup vs\nsingle/naive/mirror",
              "student | teacher layout", "kd mode/placement/compression"):
        t.add_column(c, justify="left" if "layout" in c or "kd" in c else "right")
    if show_budget:
        t.add_column("hours", justify="right")
        t.add_column("USD", justify="right")
    if show_job:
        for c in ("job strategy", "job hours", "vs separate\nmirror"):
            t.add_column(c, justify="left" if c == "job strategy" else "right")
    for r in rows:
        keys = [str(r[a.key]) for a in axes]
        if not r["feasible"]:
            # the reason goes in the widest text column; the numbers stay blank
            tail = ["-"] * (2 * show_budget + 3 * show_job)
            t.add_row(*keys, _f(r["job.gpus"], "d"), *["-"] * 6, f"[red]{escape(r['reason'])}[/]", *tail)
            continue
        comm = r["comm_bytes_per_step"] / 1e9 if r["comm_bytes_per_step"] is not None else None
        speed = "/".join(_f(r[k], ".2f") for k in ("speedup_vs_single_gpu", "speedup_vs_naive_dp", "speedup_vs_mirror"))
        layout = r["plan.student"] + (f" | {r['plan.teacher']}" if r["plan.teacher"] else "")
        kd = f"{r['plan.kd.mode']}/{r['plan.kd.placement']}/{r['plan.kd.compression']}" if r["plan.teacher"] else "-"
        if r.get("plan.kd.signal") == "sequence":
            kd = "sequence-level (teacher generates)"
        cells = [_f(r["job.gpus"], "d"), _f(r["tokens_per_s"], ",.0f"), _f(r["step_time_s"], ".3f"),
                 _f(r["mfu"], ".1%"), _f(r["memory_per_gpu_gib"], ".1f"), _f(comm, ".2f"), speed, layout, kd]
        if show_budget:
            cells += [_f(r["budget.total_hours"], ",.1f"), _f(r["budget.total_usd"], ",.0f")]
        if show_job:
            hours = r["whole_job.total_time_s"] / 3600 if r["whole_job.total_time_s"] is not None else None
            cells += [job_strategy_cell(r), _f(hours, ",.2f"), _f(r["whole_job.speedup_vs_separate_mirror"], ".2f")]
        t.add_row(*keys, *cells)
    # piped output is read by people in files and pagers: do not squeeze it to 80 columns
    console = out if out.is_terminal else Console(width=220, highlight=False)
    console.print(t)
