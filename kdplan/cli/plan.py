"""kdplan plan [JOB.toml]: choose the best layout, write plan.json, print a summary."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import planner
from ..io import write_model
from .common import (BatchOpt, DatasetTokensOpt, ClusterOpt, FixOpt, GpusOpt, JobArg, MinFidelityOpt, MinTopkOpt,
                     ObjectiveOpt, PrecOpt, RunnableOpt,
                     SeqOpt, StudentOpt, StudentPrecOpt, TeacherOpt, TeacherPrecOpt, TokensOpt, out, problem_from_flags, run_cli)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(job: JobArg = None, teacher: TeacherOpt = None, student: StudentOpt = None,
                 cluster: ClusterOpt = None, gpus: GpusOpt = None, seq_len: SeqOpt = None,
                 global_batch: BatchOpt = None, precision: PrecOpt = None, fix: FixOpt = None,
                 min_topk: MinTopkOpt = None, objective: ObjectiveOpt = None, tokens: TokensOpt = None,
                 teacher_precision: TeacherPrecOpt = None, dataset_tokens: DatasetTokensOpt = None,
                 min_fidelity: MinFidelityOpt = None, runnable: RunnableOpt = False,
                 student_precision: StudentPrecOpt = None,
                 output: Annotated[Optional[str], typer.Option("-o", "--output", help="Where to write plan.json.")] = "plan.json",
                 json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout and nothing else.")] = False,
                 top: Annotated[int, typer.Option("--top", help="Show this many next-best alternatives.", min=0, max=100)] = 3):
        """Choose the best teacher/student layout, placement, offload and compression; write plan.json and print a summary."""
        def body():
            problem = problem_from_flags(job, teacher=teacher, student=student, cluster=cluster, gpus=gpus,
                                         seq_len=seq_len, global_batch=global_batch, precision=precision,
                                         fix=fix, min_topk=min_topk, objective=objective, tokens=tokens,
                                         teacher_precision=teacher_precision, dataset_tokens=dataset_tokens,
                                         min_fidelity=min_fidelity, runnable=runnable,
                                         student_precision=student_precision)
            plan = planner.make_plan(problem, top_k=top)
            if output:
                write_model(output, plan)
            if json_out:
                print(plan.model_dump_json(indent=2))
            else:
                from .render import render_plan, render_problem
                render_problem(problem)
                render_plan(plan)
                out.print(f"plan written to {escape(output)}" if output else "")
        run_cli(body)
