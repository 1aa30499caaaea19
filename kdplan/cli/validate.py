"""kdplan validate: compare predictions with published and measured runs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import out, run_cli


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _short(table: str, width: int = 48) -> str:
    """A sweep table's name without its file path, cut to ``width``."""
    name = table.split("section", 1)[-1].strip(" '") if "section" in table else table
    return name if len(name) <= width else name[: width - 1] + "…"


def _validate(csv_path: str | None, reports: list[str], rows: bool) -> None:
    import statistics

    from ..cost.validate import ALL_CSVS, GPU_BUCKETS, compare_reports, summarize, validate_csv

    paths = [csv_path] if csv_path else [str(p) for p in ALL_CSVS]
    # the reports first: a wrong path is one error line before any table, not after all of them
    compared = compare_reports(reports) if reports else []
    results = [r for path in paths for r in validate_csv(path)]
    out.print(f"cost model vs published runs: {escape(', '.join(paths))}")
    for s in summarize(results):
        table = Table(title=escape(s.source), title_justify="left", show_header=True)
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("rows (with a measured time)", f"{s.rows} ({s.time_rows})")
        table.add_row("iteration time: median |error|", _pct(s.median_time_error))
        table.add_row("iteration time: mean |error|", _pct(s.mean_time_error))
        table.add_row(f"memory: median |error| ({s.memory_rows} rows)", _pct(s.median_memory_error))
        table.add_row("memory: mean |error|", _pct(s.mean_memory_error))
        table.add_row("fits / out-of-memory predicted right", f"{s.fit_agree}/{s.fit_rows}")
        if s.skipped:
            table.add_row("not priced (reason per row with --rows)", str(s.skipped))
        if any(v is not None for v in s.time_error_by_gpus.values()):
            table.add_row(f"time median |error| by GPUs ({' | '.join(s.time_error_by_gpus)})",
                          " | ".join(_pct(v) for v in s.time_error_by_gpus.values()))
        if s.repeat_noise:
            table.add_row("repeat noise (same config, same table): tau skips pairs closer", _pct(s.repeat_noise))
        for name, tau in s.tau_by_table.items():
            table.add_row(f"Kendall tau: {escape(_short(name))}", f"{tau:.2f}")
        out.print(table)
    scale = Table(title="iteration time median |error| by GPU count (every source)", title_justify="left")
    scale.add_column("GPUs")
    scale.add_column("rows", justify="right")
    scale.add_column("median |error|", justify="right")
    for name, lo, hi in GPU_BUCKETS:
        errs = [abs(r.time_error) for r in results if r.time_error is not None and not r.oom and lo <= r.num_gpus <= hi]
        scale.add_row(name, str(len(errs)), _pct(statistics.median(errs)) if errs else "-")
    out.print(scale)
    if rows:
        detail = Table(title="per row (time in s, memory in GiB)", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("row", "layout", "time", "pred", "error", "mem", "pred", "fits"):
            detail.add_column(col, justify="left" if col in ("row", "layout") else "right", no_wrap=True)
        notes = []
        for r in results:
            fits = ("no" if not r.predicted_fits else "yes") + (" (oom)" if r.oom else "") + ("?" if not r.fit_known else "")
            detail.add_row(escape(r.row_id), escape(r.layout or "-"), f"{r.measured_time_s:.2f}" if r.measured_time_s else "-",
                           f"{r.predicted_time_s:.2f}" if r.predicted_time_s else "-", _pct(r.time_error),
                           f"{r.measured_memory_gib:g}" if r.measured_memory_gib else "-",
                           f"{r.predicted_memory_gib:.1f}" if r.predicted_memory_gib else "-", fits)
            text = r.skip or "; ".join(r.assumptions + ([r.why] if r.why else []))
            if text:
                notes.append(f"{r.row_id}: {text}")
        # Wider than a pipe's default 80 columns: one row per line reads better than wrapped cells.
        Console(file=out.file, width=max(out.width, 110), highlight=False).print(detail)
        for line in notes:
            out.print(escape(line), soft_wrap=True)
    if reports:
        table = Table(title="run reports: predicted vs measured")
        for col in ("report", "predicted step s", "measured step s", "error", "predicted GiB",
                    "measured GiB", "error"):
            table.add_column(col)
        for rep in compared:
            table.add_row(escape(rep.path), f"{rep.predicted_time_s:.4g}" if rep.predicted_time_s else "-",
                          f"{rep.measured_time_s:.4g}", _pct(rep.time_error),
                          f"{rep.predicted_memory_gib:.2f}" if rep.predicted_memory_gib else "-",
                          f"{rep.measured_memory_gib:.2f}", _pct(rep.memory_error))
        out.print(table)


def _fit(csv_path: str | None, write: bool, loso: bool) -> None:
    import datetime

    from ..cost import fit as F
    from ..cost.validate import ALL_CSVS, build_case, read_rows
    from ..profiles import profiles_dir

    paths = [csv_path] if csv_path else [str(p) for p in ALL_CSVS]
    cases = [build_case(r) for path in paths for r in read_rows(path)]
    if not csv_path:  # the default set also holds the measured H200 blocks (kdplan/cost/fit.py)
        cases += F.block_cases()
        paths.append(str(F.BLOCK_TIMES))
    skipped: dict[str, int] = {}
    for c in cases:
        if c.skip:
            skipped[c.row["source_id"]] = skipped.get(c.row["source_id"], 0) + 1
    if loso:
        full, rows = F.leave_one_source_out(cases)
    else:
        full, rows = F.fit(cases), []
    out.print(escape(f"fitted on {full.rows} priced rows of {', '.join(full.sources)} ({', '.join(paths)})"))
    table = Table(title="fitted constants (prior -> fitted on every source)", title_justify="left")
    for col in ("constant", "prior", "fitted", "what it is"):
        table.add_column(col, justify="right" if col in ("prior", "fitted") else "left")
    for p in F.PARAMS:
        v = "- (no row)" if p.name in full.untouched else f"{full.values[p.name]:.4g}"
        table.add_row(p.name, f"{p.prior:g}", v, p.why)
    out.print(table)
    if loso:
        t = Table(title="median |error| per source: fit residual (in-sample) and left out "
                        "(fitted on every other source)", title_justify="left")
        for col in ("source", "time in-sample", "time left out", "memory in-sample", "memory left out",
                    "rows not priced"):
            t.add_column(col, justify="left" if col == "source" else "right")
        for r in rows:
            t.add_row(escape(r.source), _pct(r.in_sample[0]), _pct(r.left_out[0]), _pct(r.in_sample[1]),
                      _pct(r.left_out[1]), str(skipped.get(r.source, 0)))
        for src, n in skipped.items():
            if all(r.source != src for r in rows):
                t.add_row(escape(src), "-", "-", "-", "-", f"{n} (all)")
        # wider than a pipe's 80 columns: one source per line
        Console(file=out.file, width=max(out.width, 110), highlight=False).print(t)
        out.print("rows not priced: the reason is on each row (kdplan validate --rows)")
    else:
        inside = F.source_errors(F.price_with(cases, full.values))
        t = Table(title="fit residual (in-sample) median |error| per source", title_justify="left")
        for col in ("source", "time", "memory"):
            t.add_column(col, justify="left" if col == "source" else "right")
        for src, (te, me) in inside.items():
            t.add_row(escape(src), _pct(te), _pct(me))
        out.print(t)
    if write:
        files = F.write_profiles(full, profiles_dir(), command="kdplan validate --fit --write",
                                 date=datetime.date.today().isoformat())
        for f in files:
            out.print(f"wrote {escape(str(f))}")


def _refuse(why: str) -> None:
    from ..errors import InputError

    raise InputError(why)


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate_cmd(
        reports: Annotated[Optional[list[str]], typer.Argument(help="Run report JSON files (kdplan run --report) to compare their predicted and measured step time and memory.", show_default=False)] = None,
        csv: Annotated[Optional[str], typer.Option("--csv", help="A CSV of published runs with the columns of kdplan/data/published_runs_dev.csv (default: that file and published_runs_extra.csv next to it).", show_default=False)] = None,
        rows: Annotated[bool, typer.Option("--rows", help="Also print every row: measured, predicted, error and the assumptions made.")] = False,
        fit: Annotated[bool, typer.Option("--fit", help="Fit the cost model's fitted constants (kdplan/cost/fit.py PARAMS) to the published runs and print them with the fit residual per source.")] = False,
        write: Annotated[bool, typer.Option("--write", help="With --fit: write the fitted values, with their provenance, into the shipped profiles (profiles/).")] = False,
        loso: Annotated[bool, typer.Option("--leave-one-source-out", help="Fit on every source but one, for each source, and print each source's error when left out next to its fit residual.")] = False,
    ):
        """Compare the cost model's predictions with published runs (and your run reports); print the error per source."""
        if write and not fit:
            run_cli(_refuse, "--write needs --fit (it writes the fitted values)")
        elif fit or loso:
            run_cli(_fit, csv, write, loso)
        else:
            run_cli(_validate, csv, reports or [], rows)
