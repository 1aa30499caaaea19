"""Runs: which checkpoints a launch may write and resume from (no torch: the launcher decides
before any process group exists).

A run is one training trajectory: a plan, a seed and data. Its checkpoints live in their own
directory, ``<output_dir>/<plan|baseline>/checkpoints/<run>/step_<N>/``, next to ``run.json``
(the run's identity: plan hash, seed, data hash). Rules:

- a new invocation (no ``--resume``) starts a new run: ``<run>`` is this invocation's id
  (torchrun's ``TORCHELASTIC_RUN_ID``, a fresh uuid under ``--standalone`` and the Slurm job id
  in the script ``kdplan run --print-command`` writes; a fresh uuid for a one-process launch), so
  an earlier run's checkpoints in the same output directory are neither loaded nor overwritten;
- an elastic restart inside the invocation (attempt > 0) resumes only from that run directory;
- ``--resume`` continues the earlier run whose identity matches this launch's (plan hash, seed,
  data) from its latest complete checkpoint, writing on in that run's directory; with no such run
  it is refused in one line (exit 2), naming what differs;
- ``--steps N`` is the step the run ends at: a run already at or past N says so and exits 0.

The plan hash covers what changes the trajectory: models, layouts, KD settings, job shape and
the run settings, but not the bookkeeping (creation time, version, solver, prediction,
alternatives) nor ``run.steps`` / ``run.output_dir`` / ``run.checkpoint_every``, which may change
between a run and its continuation (nor ``run.seed``: the identity names it on its own). The data hash is the sha256 of the data file (a dataset
directory: its files' names and sizes).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from kdplan.schema import Plan

from . import CORPUS

RUN_FILE = "run.json"
UNSPECIFIC_IDS = ("", "none", "local")  # torchrun ids that do not tell invocations apart


class Refused(Exception):
    """The launch cannot continue (exit 2, one line: line breaks of any kind and control
    characters a key or value of the plan carried in are shown escaped)."""

    def __init__(self, msg: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(msg)))


@dataclass(frozen=True)
class Identity:
    plan_sha256: str
    seed: int
    data_sha256: str

    def differences(self, other: "Identity") -> list[str]:
        out = []
        if self.plan_sha256 != other.plan_sha256:
            out.append(f"plan {other.plan_sha256[:12]} (this launch: {self.plan_sha256[:12]})")
        if self.seed != other.seed:
            out.append(f"seed {other.seed} (this launch: {self.seed})")
        if self.data_sha256 != other.data_sha256:
            out.append(f"data {other.data_sha256[:12]} (this launch: {self.data_sha256[:12]})")
        return out


def plan_sha256(plan: Plan) -> str:
    data = plan.model_dump(mode="json", exclude={"created_utc", "kdplan_version", "solver", "prediction",
                                                 "alternatives"})
    for k in ("steps", "output_dir", "checkpoint_every", "seed"):  # the seed is the identity's own field
        data["run"].pop(k, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def data_sha256(path: str | None) -> str:
    p = Path(path) if path is not None else CORPUS
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}\0{f.stat().st_size}\n".encode())
    else:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def identity(plan: Plan) -> Identity:
    return Identity(plan_sha256(plan), plan.run.seed, data_sha256(plan.run.data))


def invocation_id() -> str:
    """This invocation's id, shared by its ranks and kept across its elastic restarts."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid.lower() in UNSPECIFIC_IDS:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise Refused(f"torchrun's run id {rid!r} does not tell this run from the previous one: launch with"
                          " --standalone or a unique --rdzv-id (`kdplan run` and its Slurm script do)")
        rid = os.environ.setdefault("KDPLAN_RUN_ID", uuid.uuid4().hex[:12])
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)


def _read_identity(run_dir: Path) -> Identity | None:
    try:
        d = json.loads((run_dir / RUN_FILE).read_text())
        return Identity(str(d["plan_sha256"]), int(d["seed"]), str(d["data_sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_complete(run_dir: Path) -> int:
    """Latest step with a manifest (complete; checksums are checked by the rank that loads it)."""
    steps = [int(d.name.split("_")[1]) for d in run_dir.glob("step_*")
             if d.name.split("_")[1].isdigit() and (d / "manifest.json").exists()]
    return max(steps, default=0)


def choose(checkpoints: Path, me: Identity, *, resume: bool, attempt: int) -> tuple[Path, bool]:
    """(the run directory this launch writes its checkpoints to, whether to resume from it).

    ``checkpoints`` is ``<output_dir>/<plan|baseline>/checkpoints``."""
    if resume and attempt == 0:
        runs = [d for d in checkpoints.iterdir() if d.is_dir() and (d / RUN_FILE).exists()] \
            if checkpoints.is_dir() else []
        mine = [d for d in runs if _read_identity(d) == me]
        with_steps = [d for d in mine if latest_complete(d) > 0]
        if with_steps:
            return max(with_steps, key=lambda d: (latest_complete(d), (d / RUN_FILE).stat().st_mtime_ns)), True
        if mine:
            raise Refused(f"--resume: the run in {mine[0]} has no complete checkpoint yet; start it again without"
                          " --resume")
        if runs:
            other = max(runs, key=lambda d: (d / RUN_FILE).stat().st_mtime_ns)
            theirs = _read_identity(other)
            why = ", ".join(me.differences(theirs)) if theirs else "an unreadable run.json"
            raise Refused(f"--resume: no run in {checkpoints} matches this plan, seed and data (the latest,"
                          f" {other.name}, has {why}); start a new run without --resume")
        raise Refused(f"--resume: no earlier run in {checkpoints} to continue; start one without --resume")
    run_dir = checkpoints / invocation_id()
    if attempt > 0:  # an elastic restart: only this invocation's own run (or the one it resumed)
        if resume:
            return choose(checkpoints, me, resume=True, attempt=0)
        return run_dir, True
    # run.json of this invocation's directory may already be there: another rank of this
    # invocation wrote it (the ranks start at their own pace). Another run's is refused.
    if (run_dir / RUN_FILE).exists() and _read_identity(run_dir) != me:
        raise Refused(f"{run_dir} already holds another run: launch with --standalone or a unique --rdzv-id")
    return run_dir, False


def start(run_dir: Path, me: Identity, *, rank: int) -> None:
    """Write the run's identity (rank 0 of a new run's first attempt)."""
    if rank != 0 or (run_dir / RUN_FILE).exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"plan_sha256": me.plan_sha256, "seed": me.seed, "data_sha256": me.data_sha256,
                               "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                   timespec="seconds")}, indent=1))
    os.replace(tmp, run_dir / RUN_FILE)
