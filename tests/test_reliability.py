"""Fault injection on a real 2-process gloo run (tiny llama teacher and student, data parallel,
a checkpoint every 2 steps): killed ranks restart and lose nothing, damaged checkpoints are
skipped, a hung rank ends the run naming itself and leaves no process behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import run_kdplan
from exec_helpers import launch, layout, losses, make_plan, make_teacher_checkpoint, read_report, write_plan

STEPS = 6
ENV = {"OMP_NUM_THREADS": "1", "KDPLAN_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """The plan and its uninterrupted run (the reference every fault is compared with)."""
    tmp = tmp_path_factory.mktemp("reliability")
    plan = make_plan(tmp, layout(dp=2), teacher_ckpt=make_teacher_checkpoint(tmp / "teacher"), checkpoint_every=2)
    path = write_plan(tmp / "plan.json", plan)
    r = launch(path, 2, "--steps", STEPS, "--output-dir", tmp / "ref", "--report", tmp / "ref.json")
    assert r.returncode == 0, r.stderr[-4000:]
    ref = read_report(tmp / "ref.json")
    assert [p["step"] for p in ref["measured"]["loss"]] == list(range(STEPS)) and not ref["restarts"]
    return tmp, path, losses(ref)


def _run_dir(out: Path) -> Path:
    """The one run directory under ``out`` (each invocation writes its checkpoints in its own)."""
    runs = [d for d in (out / "plan" / "checkpoints").iterdir() if (d / "run.json").exists()]
    assert len(runs) == 1, runs
    return runs[0]


def _ours(tmp: Path) -> list[int]:
    """Processes still alive whose command line names this test's directory (orphans)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if str(tmp) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def test_kills_and_a_hang_restart_and_lose_nothing(ctx):
    """Through `kdplan run --max-restarts`: rank 1 killed at step 1 (before the first checkpoint),
    rank 0 killed at step 2 (right after the checkpoint of step 2), rank 1 hung at step 3 (the
    watchdog ends it after --timeout-s), rank 0 killed while writing the checkpoint of step 4
    (the half-written one is never used). Each restart resumes from the latest complete
    checkpoint and the losses of the final attempt equal the uninterrupted run's exactly."""
    tmp, path, ref = ctx
    out = tmp / "faulty"
    r = run_kdplan("run", path, "--steps", STEPS, "--max-restarts", 4, "--timeout-s", 5, "--output-dir", out,
                   "--report", tmp / "faulty.json", "--inject-kill", "1:1", "--inject-kill", "0:2",
                   "--inject-hang", "1:3", "--inject-kill", "0:3:save", env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 1 stuck at step 3" in r.stderr
    rep = read_report(tmp / "faulty.json")
    got = [(x["rank"], x["resumed_from_step"], x["steps_redone"]) for x in rep["restarts"]]
    assert got == [(1, 0, 1), (0, 2, 0), (1, 2, 1), (0, 2, 1)]
    assert [p["step"] for p in rep["measured"]["loss"]] == list(range(2, STEPS))
    assert losses(rep) == ref[2:]  # exactly: data cursor, RNG, optimizer and teacher outputs restored
    ckpts = _run_dir(out)
    assert sorted(d.name for d in ckpts.iterdir()) == ["run.json", "step_00000002", "step_00000004", "step_00000006"]
    for f in ckpts.rglob("*"):
        assert not f.stat().st_mode & 0o022, f"{f} is group- or world-writable"
    assert not _ours(tmp / "faulty")


def test_offline_kd_kill_resumes_the_cache_exactly(ctx):
    """Offline KD (teacher top-k outputs cached on disk before training): rank 1 killed at step 3;
    the restart re-reads the cache from step 2 on and matches an uninterrupted offline run."""
    tmp, _, _ = ctx
    plan = make_plan(tmp, layout(dp=2), mode="offline", compression="topk:16:8", teacher_ckpt=tmp / "teacher",
                     checkpoint_every=2)
    path = write_plan(tmp / "offline.json", plan)
    r = launch(path, 2, "--steps", STEPS, "--output-dir", tmp / "off-ref", "--report", tmp / "off-ref.json")
    assert r.returncode == 0, r.stderr[-4000:]
    r = run_kdplan("run", path, "--steps", STEPS, "--max-restarts", 1, "--output-dir", tmp / "off-kill",
                   "--report", tmp / "off-kill.json", "--inject-kill", "1:3", env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = read_report(tmp / "off-kill.json")
    assert [(x["rank"], x["resumed_from_step"], x["steps_redone"]) for x in rep["restarts"]] == [(1, 2, 1)]
    assert losses(rep) == losses(read_report(tmp / "off-ref.json"))[2:]


def test_damaged_checkpoints_are_skipped_with_a_message(ctx):
    """Newest checkpoint with a flipped byte (same size), the one before truncated: both are
    named and skipped, and the run resumes from the one before them, exactly."""
    tmp, path, ref = ctx
    out = tmp / "damaged"
    shutil.copytree(tmp / "ref", out)
    ckpts = _run_dir(out)
    biggest = lambda d: max((f for f in d.iterdir() if f.name != "manifest.json"), key=lambda f: f.stat().st_size)
    flipped = biggest(ckpts / "step_00000006")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut = biggest(ckpts / "step_00000004")
    cut.write_bytes(cut.read_bytes()[:-100])
    r = launch(path, 2, "--steps", 3, "--resume", "--output-dir", out, "--report", tmp / "damaged.json")
    assert r.returncode == 0, r.stderr[-4000:]
    msgs = [line for line in r.stderr.splitlines() if "is damaged" in line]
    assert len(msgs) == 2, r.stderr[-4000:]
    assert "step_00000006" in msgs[0] and flipped.name in msgs[0] and "sha256" in msgs[0]
    assert "step_00000004" in msgs[1] and cut.name in msgs[1] and "bytes" in msgs[1]
    rep = read_report(tmp / "damaged.json")
    assert [p["step"] for p in rep["measured"]["loss"]] == [2] and losses(rep) == ref[2:3]


def test_a_rerun_never_resumes_another_runs_checkpoints(ctx):
    """The rerun of issue 14: an earlier run reached step 6 in the output directory; a new
    invocation (--steps 4, rank 1 killed at step 3, one restart) resumes from its own step-2
    checkpoint, never the earlier run's step 6, and ends with the uninterrupted run's losses. Then
    --resume continues only a run of the same plan, seed and data, and one already at or past
    --steps says so in one line and exits 0."""
    tmp, path, ref = ctx
    out = tmp / "rerun"
    shutil.copytree(tmp / "ref", out)
    earlier = _run_dir(out)
    before = sorted(d.name for d in earlier.iterdir())
    r = run_kdplan("run", path, "--steps", 4, "--max-restarts", 1, "--output-dir", out, "--report", tmp / "rerun.json",
                   "--inject-kill", "1:3", env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = read_report(tmp / "rerun.json")
    assert [(x["rank"], x["resumed_from_step"], x["steps_redone"]) for x in rep["restarts"]] == [(1, 2, 1)]
    assert losses(rep) == ref[2:4]  # exactly the uninterrupted run's
    runs = sorted((d for d in (out / "plan" / "checkpoints").iterdir()), key=lambda d: d != earlier)
    assert len(runs) == 2 and sorted(d.name for d in earlier.iterdir()) == before  # the earlier run untouched
    assert sorted(d.name for d in runs[1].iterdir()) == ["run.json", "step_00000002", "step_00000004"]

    # --resume picks the matching run with the latest step (the earlier one, at 6): nothing to do
    r = run_kdplan("run", path, "--steps", 5, "--resume", "--output-dir", out, "--report", tmp / "none.json", env=ENV)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-4000:]
    assert "nothing to do" in r.stdout and "already at step 6, at or past --steps 5" in r.stdout, r.stdout
    assert not (tmp / "none.json").exists()

    # another seed is another run: refused in one line before anything starts
    plan = make_plan(tmp, layout(dp=2), teacher_ckpt=tmp / "teacher", checkpoint_every=2)
    other = write_plan(tmp / "seed4.json", plan.model_copy(update={"run": plan.run.model_copy(update={"seed": 4})}))
    r = run_kdplan("run", other, "--steps", 8, "--resume", "--output-dir", out, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-4000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "seed 3 (this launch: 4)" in r.stderr, r.stderr
    r = run_kdplan("run", path, "--resume", "--output-dir", tmp / "empty", env=ENV)
    assert r.returncode == 2 and "no earlier run" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_hung_rank_ends_the_run_naming_it(ctx):
    """No restarts left: the hung rank's watchdog names it and the step within the timeout,
    torchrun stops the other rank, the run fails, and no process of the run survives."""
    tmp, path, _ = ctx
    r = run_kdplan("run", path, "--steps", STEPS, "--timeout-s", 4, "--output-dir", tmp / "hung",
                   "--inject-hang", "0:2", env=ENV, timeout=240)
    assert r.returncode != 0
    assert "rank 0 stuck at step 2" in r.stderr, r.stderr[-4000:]
    # ended by the step watchdog at the 4 s it was given, not by a collective timing out
    assert "(step timeout 4 s); ending the run" in r.stderr, r.stderr[-4000:]
    assert "rank 1 stuck" not in r.stderr  # the waiting rank is not blamed
    assert not _ours(tmp / "hung")


def test_bad_fault_flags_are_refused(ctx):
    """One line and exit 2 before anything starts."""
    _, path, _ = ctx
    for flags, msg in ((["--inject-kill", "1"], "RANK:STEP"), (["--inject-kill", "0:1:load"], "save"),
                       (["--inject-hang", "5:1"], "rank 5"), (["--timeout-s", "0"], "--timeout-s"),
                       (["--max-restarts", "-1"], "--max-restarts")):
        r = run_kdplan("run", path, *flags, env=ENV)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
