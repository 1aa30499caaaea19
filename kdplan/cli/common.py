"""Options shared by every command that plans, and the error boundary of the CLI."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from typer.core import TyperGroup

try:  # typer >= 0.20 ships its own copy of click; its exceptions are not click's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_errors

from ..errors import InputError, KdplanError
from ..jobs import Problem, load_job, resolve

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JobArg = Annotated[Optional[str], typer.Argument(help="Job TOML (teacher, student, cluster, batch, KD settings, pins). Omit for the seed scenario: gpt-13b -> gpt-1.3b on 32 A100-80GB.", show_default=False)]
TeacherOpt = Annotated[Optional[str], typer.Option("--teacher", help="Teacher: preset (gpt-13b, llama-3-70b, ...) or path to a HF config.json; 'none' plans plain training.", show_default=False)]
StudentOpt = Annotated[Optional[list[str]], typer.Option("--student", help="Student: preset (gpt-1.3b, llama-3-8b, ...) or path to a HF config.json. Repeat it for several students of one teacher (a whole-job plan: prediction.job).", show_default=False)]
DatasetTokensOpt = Annotated[Optional[float], typer.Option("--dataset-tokens", help="Unique tokens of the corpus: epochs = --tokens / this (default: one epoch).", show_default=False)]
StudentPrecOpt = Annotated[Optional[str], typer.Option("--student-precision", help="Student training precision: job (the job's --precision, default) | fp8 (Transformer Engine style fp8 GEMMs with bf16 master weights; H100/H200/H800 and a bf16 job only; changes numerics; `kdplan run` does not execute it).", show_default=False)]
ClusterOpt = Annotated[Optional[str], typer.Option("--cluster", help="Cluster preset (dgx-a100-80g, dgx-a100-40g, dgx-h100, dgx-h200, cpu-local, mixed-a100-h100) or a cluster YAML.", show_default=False)]
GpusOpt = Annotated[Optional[int], typer.Option("--gpus", help="Total GPUs (nodes = N / GPUs per node).", show_default=False)]
SeqOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence.", show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--global-batch", help="Sequences per optimizer step.", show_default=False)]
PrecOpt = Annotated[Optional[str], typer.Option("--precision", help="bf16 | fp16 | fp32.", show_default=False)]
FixOpt = Annotated[Optional[list[str]], typer.Option("--fix", help="Pin part of the layout, KEY=VALUE, repeatable (teacher.tp, student.pp, student.zero, student.micro_batch, student.recompute, kd.placement, kd.compression=topk:64:8, kd.signal=sequence, teacher.gpu=a100-80g, ...). With every key pinned, plan is a pure simulation.", show_default=False)]
MinTopkOpt = Annotated[Optional[int], typer.Option("--min-topk", help="Fidelity floor: never send fewer teacher logits per token than this.", show_default=False)]
MinFidelityOpt = Annotated[Optional[float], typer.Option("--min-fidelity", help="Ask for quality instead of a teacher-output format: only formats whose measured share of dense KD's gain (kd.fidelity_curve, benchmarks/compression_quality.py) is at least this are eligible; unmeasured formats are not.", show_default=False)]
RunnableOpt = Annotated[bool, typer.Option("--runnable", help="Only layouts and features `kdplan run` executes (the executor's declared limits, kdplan.schema.capability); same as [solver] runnable = true.")]
ObjectiveOpt = Annotated[Optional[str], typer.Option("--objective", help="time (step time) or cost (dollars per token).", show_default=False)]
TeacherPrecOpt = Annotated[Optional[str], typer.Option("--teacher-precision", help="Teacher forward precision: bf16 (exact, default) | fp8 (H100/H200) | int8 (A100/H100/H200): quantized teacher weights, faster teacher GEMMs, slightly different teacher outputs | auto (the solver chooses among what the GPUs support).", show_default=False)]
TokensOpt = Annotated[Optional[float], typer.Option("--tokens", help="Token budget of each student (for hours and dollars, and the whole-job plan).", show_default=False)]


def problem_from_flags(job: str | None, *, teacher=None, student=None, cluster=None, gpus=None,
                       seq_len=None, global_batch=None, precision=None, fix=None, min_topk=None,
                       objective=None, tokens=None, teacher_precision=None, dataset_tokens=None,
                       min_fidelity=None, runnable: bool = False, student_precision=None) -> Problem:
    if job is not None and not job.strip():  # Path("") is ".": the message would name the folder
        raise InputError(f"job file name {job!r} is empty; give a job TOML or leave it out")
    spec = load_job(job)
    students = None
    if isinstance(student, (list, tuple)):  # --student, repeatable: several students of one teacher
        student, students = (student[0], list(student)) if student else (None, None)
        if students is not None and len(students) == 1:
            students = None
        if student is not None:  # the flags replace the file's list
            spec = spec.model_copy(update={"students": None})
    overrides: dict[str, Any] = {
        "students": students, "dataset_tokens": dataset_tokens,
        "teacher": teacher, "student": student, "cluster": cluster, "gpus": gpus,
        "seq_len": seq_len, "global_batch": global_batch, "precision": precision,
        "tokens": tokens, "kd.min_topk": min_topk, "kd.min_fidelity": min_fidelity, "solver.objective": objective,
        "solver.runnable": True if runnable else None,  # None: the job file's [solver] runnable
        "teacher_precision": teacher_precision.strip().lower() if teacher_precision else teacher_precision,
        "student_precision": student_precision.strip().lower() if student_precision else student_precision,
    }
    if teacher is not None and teacher.strip().lower() in ("none", "null", ""):
        overrides["teacher"] = None
        spec = spec.model_copy(update={"teacher": None})
    return resolve(spec, overrides=overrides, pins=fix, job_path=job)


def run_cli(fn, *args, **kwargs):
    """Run a command body; turn kdplan errors into one stderr line and their exit code."""
    try:
        return fn(*args, **kwargs)
    except KdplanError as e:
        # A Text object, not markup: user values in the message ("[/x]", ":smile:") print as
        # they are instead of being parsed (a stray closing tag made rich raise a traceback).
        err.print(Text.assemble(("error:", "bold red"), " ", one_line(e)), soft_wrap=True)
        raise typer.Exit(e.exit_code)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)
    except Exception as e:  # an internal bug: one line unless debugging
        if os.environ.get("KDPLAN_DEBUG"):
            raise
        err.print(Text.assemble(("internal error:", "bold red"),
                                f" {type(e).__name__}: {one_line(e)} (set KDPLAN_DEBUG=1 for a traceback)"),
                  soft_wrap=True)
        raise typer.Exit(1)


class OneLineUsageErrors(TyperGroup):
    """A bad flag value, an unknown option or a missing argument is bad input like any other:
    one line on stderr and exit 2 (click's default is a usage block in a box, several lines)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click_errors.UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click_errors.UsageError as e:  # sub-command parsing happens in here
            _usage_error(e)


def _usage_error(e):
    if isinstance(e, getattr(click_errors, "NoArgsIsHelpError", ())):
        raise e  # `kdplan` alone prints the help
    cmd = e.ctx.command_path if e.ctx else "kdplan"
    err.print(Text.assemble(("error:", "bold red"), f" {cmd}: {one_line(e.format_message())} "
                            f"(see {cmd} --help)"), soft_wrap=True)
    raise typer.Exit(2)


def one_line(e: BaseException | str) -> str:
    """The message on one line: line breaks (\\n, \\x85, \\u2028...) and terminal control
    characters a user value carried in are shown escaped, never printed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))


def not_implemented(what: str) -> None:
    err.print(f"kdplan {what}: not implemented yet")
    raise typer.Exit(1)


def is_tty() -> bool:
    return sys.stdout.isatty()
