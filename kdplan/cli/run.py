"""kdplan run PLAN: launch the executor with torchrun (a subprocess; this module never imports torch).

Single node: ``torchrun --standalone --nproc_per_node=WORLD -m executor.launch PLAN ...`` with
OMP_NUM_THREADS=1 (one thread per process: on a shared CPU more threads spin and run 10-65x
slower). Before that, ``executor.launch --check-only`` refuses a plan that cannot run here in
one line (exit 2), so a bad plan never reaches torchrun's multi-rank tracebacks. Multi-node
plans are printed as a Slurm batch script (``--print-command``) to submit from a login node.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ..io import load_model
from ..schema import Plan
from ..schema.plan import BASELINE_FIELDS
from .common import err, out, run_cli

BASELINES = tuple(BASELINE_FIELDS)


def world_size(plan: Plan, baseline: str | None) -> int:
    """Processes a run needs: the plan's, or those of the baseline layouts the plan carries."""
    if baseline is None:
        return plan.world_size
    try:
        return plan.baseline(baseline).world_size
    except ValueError as e:
        raise InputError(f"--baseline {baseline}: {e}") from None


def launch_args(plan_path: str, *, steps, report, baseline, resume, output_dir, checkpoint_every=None,
                timeout_s=None, inject_kill=(), inject_hang=()) -> list[str]:
    args = ["-m", "executor.launch", plan_path]
    if checkpoint_every is not None:
        args += ["--checkpoint-every", str(checkpoint_every)]
    if timeout_s is not None:
        args += ["--timeout-s", str(timeout_s)]
    for flag, points in (("--inject-kill", inject_kill), ("--inject-hang", inject_hang)):
        for p in points or ():
            args += [flag, p]
    if steps is not None:
        args += ["--steps", str(steps)]
    if report:
        args += ["--report", report]
    if baseline:
        args += ["--baseline", baseline]
    if resume:
        args.append("--resume")
    if output_dir:
        args += ["--output-dir", output_dir]
    return args


def torchrun_argv(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    """torchrun's elastic agent restarts every worker (up to ``max_restarts`` times) when one dies;
    the restarted workers resume from the latest intact checkpoint by themselves."""
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    head = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, *_torchrun_flags(nproc, max_restarts), *args]


def _torchrun_flags(nproc: int, max_restarts: int) -> list[str]:
    elastic = [f"--max-restarts={max_restarts}", "--monitor-interval=0.5"] if max_restarts else []
    return ["--standalone", f"--nproc_per_node={nproc}", *elastic]


def slurm_script(plan: Plan, nproc: int, args: list[str]) -> str:
    per_node = plan.job.gpus_per_node
    nodes = -(-nproc // per_node)
    cmd = " ".join(shlex.quote(a) for a in args)
    return f"""#!/bin/bash
#SBATCH --job-name=kdplan
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={per_node}
#SBATCH --exclusive
# Written by `kdplan run --print-command`: {nproc} processes, {per_node} per node.
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=1
srun torchrun --nnodes={nodes} --nproc_per_node={per_node} \\
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head:29500" \\
  {cmd}
"""


def run(plan_path: str, *, steps, report, baseline, resume, nproc, print_command, output_dir,
        checkpoint_every=None, max_restarts=0, timeout_s=None, inject_kill=(), inject_hang=()) -> int:
    if checkpoint_every is not None and checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be >= 0 steps (0: never), got {checkpoint_every}")
    if max_restarts < 0:
        raise InputError(f"--max-restarts must be >= 0, got {max_restarts}")
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"--timeout-s must be > 0 seconds, got {timeout_s}")
    if baseline is not None and baseline not in BASELINES:
        raise InputError(f"--baseline {baseline!r}: expected one of {', '.join(BASELINES)}")
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    plan = load_model(Plan, plan_path)
    world = world_size(plan, baseline)
    if nproc is not None and nproc != world:
        raise InputError(f"--nproc {nproc}: the plan{' baseline ' + baseline if baseline else ''} needs {world}"
                         " processes (re-plan with --gpus to change it)")
    args = launch_args(plan_path, steps=steps, report=report, baseline=baseline, resume=resume, output_dir=output_dir,
                       checkpoint_every=checkpoint_every, timeout_s=timeout_s, inject_kill=inject_kill,
                       inject_hang=inject_hang)
    multi_node = world > plan.job.gpus_per_node
    if print_command:
        out.print(" ".join(shlex.quote(a) for a in ["torchrun", *_torchrun_flags(world, max_restarts), *args]),
                  soft_wrap=True, markup=False)
        if multi_node:
            out.print(slurm_script(plan, world, args), markup=False, soft_wrap=True)
        return 0
    if multi_node:
        raise InputError(f"{plan_path}: the plan spans {-(-world // plan.job.gpus_per_node)} nodes; submit the"
                         " Slurm script printed by `kdplan run --print-command`")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    check = subprocess.run([sys.executable, *args, "--check-only"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        msg = (check.stderr.strip().splitlines() or ["executor check failed"])[-1].removeprefix("error: ")
        raise InputError(msg) if check.returncode == 2 else RuntimeError(msg)
    err.print(f"launching {world} process{'es' if world > 1 else ''}: torchrun --standalone --nproc_per_node={world}"
              f" -m executor.launch {plan_path}", soft_wrap=True, markup=False)
    return subprocess.run(torchrun_argv(world, args, max_restarts), env=env).returncode


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(plan: Annotated[str, typer.Argument(help="plan.json written by `kdplan plan`.")],
                steps: Annotated[Optional[int], typer.Option("--steps", help="The step the run ends at (default: the plan's run.steps); a resumed run continues to it, and one already there says so and exits 0.")] = None,
                report: Annotated[Optional[str], typer.Option("--report", help="Write the run report here (default: <output_dir>/<plan|baseline>/report.json).")] = None,
                baseline: Annotated[Optional[str], typer.Option("--baseline", help="Run a baseline with the same models and data instead: naive-dp | single | mirror.")] = None,
                resume: Annotated[bool, typer.Option("--resume", help="Continue the earlier run of this plan, seed and data in the output directory from its latest complete checkpoint (refused if there is none). Without it every run starts afresh in its own checkpoint directory.")] = False,
                nproc: Annotated[Optional[int], typer.Option("--nproc", help="Processes (must equal the plan's world size; checked).")] = None,
                output_dir: Annotated[Optional[str], typer.Option("--output-dir", help="Override the plan's run.output_dir.")] = None,
                print_command: Annotated[bool, typer.Option("--print-command", help="Print the torchrun command (and a Slurm script for multi-node plans) instead of running.")] = False,
                checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Checkpoint every K steps (overrides the plan's run.checkpoint_every; 0: never).")] = None,
                max_restarts: Annotated[int, typer.Option("--max-restarts", help="Restart all workers up to R times when one dies; they resume from the latest intact checkpoint.")] = 0,
                timeout_s: Annotated[Optional[float], typer.Option("--timeout-s", help="Step timeout in seconds (default: from the plan's predicted step time, at least 120 s); a rank stuck longer ends the run.")] = None,
                inject_kill: Annotated[Optional[list[str]], typer.Option("--inject-kill", help="Rehearse a failure: RANK:STEP SIGKILLs that rank at the start of that step (RANK:STEP:save: while writing the checkpoint at its end), once per job (repeatable).")] = None,
                inject_hang: Annotated[Optional[list[str]], typer.Option("--inject-hang", help="Rehearse a hang: RANK:STEP makes that rank stop answering at that step, once (repeatable).")] = None):
        """Run a plan with torchrun (or print the torchrun / Slurm command) and write a run report."""
        rc = run_cli(run, plan, steps=steps, report=report, baseline=baseline, resume=resume, nproc=nproc,
                     print_command=print_command, output_dir=output_dir, checkpoint_every=checkpoint_every,
                     max_restarts=max_restarts, timeout_s=timeout_s, inject_kill=inject_kill or [],
                     inject_hang=inject_hang or [])
        if rc:
            raise typer.Exit(rc)
