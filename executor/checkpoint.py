"""Distributed checkpoints: torch.distributed.checkpoint, written atomically, resumed exactly.

Layout: ``<run_dir>/step_<N>/`` holds the DCP shards (student model and AdamW
state per pipeline stage, keyed by HF parameter names, so a layout with the same pipeline split
can load them whatever its dp / tp / ZeRO), one ``rank<r>.pt``
per student rank with the RNG states and cursors, and ``manifest.json`` (file sizes and sha256).
Everything is written under ``step_<N>.tmp`` first and renamed only once every rank has finished
and the manifest is written: a directory named ``step_<N>`` is complete by construction.

The data cursor and the teacher-output cursor are the step number: batches are a pure function
of (seed, step), the teacher (co-located, disaggregated or offline) produces the targets of step
N for the samples of step N, and offline outputs are found by sample hash.

``<run_dir>`` is one run's own directory (``executor.runs``: which run a launch writes to and
may resume from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kdplan.schema import Plan


def due(plan: Plan, step: int) -> bool:
    every = plan.run.checkpoint_every
    return every > 0 and step % every == 0


def _state(parts, opts, stage_ids) -> dict:
    """Model and optimizer state per pipeline stage on this rank, keyed by the stage's index: the
    optimizer's param_groups are plain objects that DCP stores once per key, so two stages must
    never share one."""
    state = {}
    for i, p, o in zip(stage_ids, parts, opts):
        m, s = get_state_dict(p, o)
        state[f"stage{i}"] = {"model": m, "optim": s}
    return state


def save(run_dir: Path, step: int, parts, opts, stage_ids, *, group, rank: int, fault=None) -> Path:
    """``fault`` (tests, rehearsals) is called once the shards are on disk, before the manifest."""
    final = Path(run_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    lead = rank == min(dist.get_process_group_ranks(group))
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    dcp.save(_state(parts, opts, stage_ids), checkpoint_id=str(tmp), process_group=group)
    torch.save({"step": step, "rng": torch.get_rng_state()}, tmp / f"rank{rank}.pt")
    if fault is not None:
        fault()
    dist.barrier(group=group)
    if lead:
        for f in tmp.iterdir():  # never world- or group-writable, whatever the umask
            f.chmod(f.stat().st_mode & 0o755)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        manifest = tmp / "manifest.json"
        with open(manifest, "w") as f:  # flushed before the rename publishes the directory
            f.write(json.dumps({"step": step, "files": files}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        manifest.chmod(0o644)
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier(group=group)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(d: Path, *, checksums: bool = True) -> str | None:
    """Why checkpoint directory ``d`` cannot be used (None: it is complete and intact). Complete
    means a manifest exists (it is written last, then the directory renamed); intact means every
    listed file has the recorded size and, with ``checksums``, the recorded sha256."""
    m = d / "manifest.json"
    if not m.exists():
        return "no manifest.json (an interrupted write)"
    try:
        files = json.loads(m.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for name, f in files.items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != f["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {f['bytes']} (truncated?)"
        if checksums and _sha256(p) != f["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def complete(d: Path) -> bool:
    return problem(d, checksums=False) is None


def latest_step(run_dir: Path, *, say=None) -> int:
    """Step of the latest complete, intact checkpoint (0 when there is none). Newer ones that
    are complete but fail their sizes or checksums are skipped, each with one line to ``say``;
    directories without a manifest (writes that never finished) are skipped silently."""
    r = Path(run_dir)
    dirs = [d for d in r.glob("step_*") if d.name.split("_")[1].isdigit()] if r.exists() else []
    for d in sorted(dirs, key=lambda d: int(d.name.split("_")[1]), reverse=True):
        if not (d / "manifest.json").exists():
            continue
        why = problem(d)
        if why is None:
            return int(d.name.split("_")[1])
        if say is not None:
            say(f"warning: checkpoint {d} is damaged: {why}; skipping it, using an earlier one")
    return 0


def load(run_dir: Path, step: int, parts, opts, stage_ids, *, group) -> None:
    d = Path(run_dir) / f"step_{step:08d}"
    state = _state(parts, opts, stage_ids)
    dcp.load(state, checkpoint_id=str(d), process_group=group)
    for i, p, o in zip(stage_ids, parts, opts):
        set_state_dict(p, o, model_state_dict=state[f"stage{i}"]["model"], optim_state_dict=state[f"stage{i}"]["optim"])
    mine = d / f"rank{dist.get_rank()}.pt"
    if mine.exists():  # same layout: restore this rank's RNG exactly
        torch.set_rng_state(torch.load(mine, weights_only=True)["rng"])
