"""Elastic restarts, fault injection and the hang watchdog.

torchrun's elastic agent (``--max-restarts R``) restarts every worker when one dies; the workers
of attempt k > 0 (TORCHELASTIC_RESTART_COUNT) resume from the latest complete checkpoint and run
to the end step chosen by attempt 0. Everything they need to know about earlier attempts of the
same torchrun job (TORCHELASTIC_RUN_ID) lives in ``<out_dir>/elastic/``:

- ``log.jsonl``: one line per attempt, written by rank 0 on start (start and end step, steps
  completed by the previous attempt), read back into the report's ``restarts``;
- ``progress-<run>``: steps completed so far (rank 0 overwrites it after each step);
- ``<run>-kill-rank<R>-step<S>.json``: a fired fault, written BEFORE the fault fires so the
  restarted job does not fire it again, and naming the rank that died.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

TIMEOUT_FLOOR_S = 3.0  # below this the watchdog would trip on ordinary scheduling noise


def run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "local")


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_points(specs: list[str] | None, flag: str) -> list[tuple[int, int, str]]:
    """``RANK:STEP`` (at the start of that step) or ``RANK:STEP:save`` (while the checkpoint
    written at the end of that step is on disk but not yet published) -> (rank, step, phase);
    ValueError names the flag and the bad value."""
    points = []
    for s in specs or []:
        parts = s.split(":")
        phase = parts.pop() if len(parts) == 3 else "step"
        try:
            rank, step = (int(x) for x in parts)
        except ValueError:
            raise ValueError(f"{flag} {s!r}: expected RANK:STEP or RANK:STEP:save (integers)") from None
        if rank < 0 or step < 0 or phase not in ("step", "save"):
            raise ValueError(f"{flag} {s!r}: rank and step must be >= 0, the phase 'save' if given")
        points.append((rank, step, phase))
    return points


class Elastic:
    """This rank's view of the job's attempts and its injected faults."""

    def __init__(self, out_dir: Path, rank: int, kills=(), hangs=()):
        self.dir = Path(out_dir) / "elastic"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.run, self.attempt = rank, run_id(), attempt()
        self.faults = [("kill", *k) for k in kills] + [("hang", *h) for h in hangs]
        self._progress = self.dir / f"progress-{self.run}"

    # ---- attempts ------------------------------------------------------------------------------

    def _entries(self) -> list[dict]:
        log = self.dir / "log.jsonl"
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("run") == self.run]

    def begin(self, start: int, end: int) -> int:
        """Record this attempt (rank 0) and return the step to run to: attempt 0 chooses it, a
        restart keeps it. Call on every rank, then barrier, before the first step."""
        first = next((e for e in self._entries() if e["attempt"] == 0), None)
        if self.attempt > 0 and first is not None:
            end = first["end"]
        if self.rank == 0:
            done = int(self._progress.read_text() or 0) if self._progress.exists() else start
            entry = {"run": self.run, "attempt": self.attempt, "at_utc": _utc(), "start": start, "end": end,
                     "completed_before": done}
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        return end

    def completed(self, steps_done: int) -> None:
        if self.rank == 0:
            self._progress.write_text(str(steps_done))

    def restarts(self) -> list[dict]:
        """Restart records (kdplan.schema.Restart fields) for the attempts after the first."""
        fired = []
        for m in sorted(self.dir.glob(f"{self.run}-*.json")):
            fired.append(json.loads(m.read_text()))
        out = []
        for e in self._entries():
            if e["attempt"] == 0:
                continue
            # the fault that ended the previous attempt: the latest fired before this attempt began
            cause = [f for f in fired if f["attempt"] == e["attempt"] - 1]
            out.append({"at_utc": cause[-1]["at_utc"] if cause else e["at_utc"],
                        "rank": cause[-1]["rank"] if cause else None,
                        "resumed_from_step": e["start"],
                        "steps_redone": max(0, e["completed_before"] - e["start"])})
        return out

    # ---- fault injection -----------------------------------------------------------------------

    def at_step(self, step: int, phase: str = "step") -> None:
        """Fire this rank's fault planned for ``step`` (and ``phase``), once per job."""
        for kind, r, s, ph in self.faults:
            if r != self.rank or s != step or ph != phase:
                continue
            marker = self.dir / f"{self.run}-{kind}-rank{r}-step{s}{'-save' if ph == 'save' else ''}.json"
            if marker.exists():
                continue
            # written (and flushed to the OS) before the fault: the restart must see it
            marker.write_text(json.dumps({"kind": kind, "rank": r, "step": s, "attempt": self.attempt,
                                          "at_utc": _utc()}))
            print(f"fault injection: {kind} rank {r} at step {s}{' during the checkpoint' if ph == 'save' else ''}",
                  file=sys.stderr, flush=True)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:  # hang: stop answering, like a rank stuck in a kernel or a deadlock
                time.sleep(3600)


class Watchdog:
    """Ends the run when a step takes longer than ``timeout_s`` on this rank.

    When a rank stops answering, the others soon block in a collective waiting for it, so every
    watchdog trips at about the same time. To name the culprit each one writes how far it got
    into the step (``mark`` counts micro-batches and the optimizer step) to
    ``<out_dir>/elastic/stall-<run>-<attempt>/``; the ranks that got least far, or wrote nothing
    at all (frozen), are the stuck ones. A stuck rank prints ``rank R stuck at step S`` and
    exits non-zero; torchrun then stops the others (and restarts the job if restarts remain).
    """

    def __init__(self, rank: int, timeout_s: float, out_dir: Path, first_step_factor: float = 3.0):
        self.rank, self.timeout = rank, max(TIMEOUT_FLOOR_S, timeout_s)
        self.dir = Path(out_dir) / "elastic" / f"stall-{run_id()}-{attempt()}"
        self.factor = first_step_factor  # the first step after a start warms up (shape inference)
        self.ranks = [rank]
        self.step, self.progress, self.t0, self.first = None, 0, time.monotonic(), True
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="kdplan-watchdog", daemon=True).start()

    def arm(self, ranks) -> None:
        """The ranks that take steps together (and run a watchdog)."""
        self.ranks = sorted(ranks)

    def beat(self, step: int) -> None:
        self.first = self.step is None
        self.step, self.progress, self.t0 = step, 0, time.monotonic()

    def mark(self) -> None:
        self.progress += 1

    def extend(self) -> None:
        """A new full timeout for the next phase of the same step (a checkpoint save)."""
        self.t0 = time.monotonic()

    def pause(self) -> None:
        """Between two phases of one run (students one after another: the next student's meshes and
        model are built): no step is watched until the next ``beat``, which counts as a first step."""
        self.step = None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 10)):
            if self.step is not None and time.monotonic() - self.t0 >= self.timeout * (self.factor if self.first else 1):
                self._blame()

    def _blame(self) -> None:
        step, late = self.step, time.monotonic() - self.t0
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".rank{self.rank}.tmp"
        tmp.write_text(json.dumps([step, self.progress]))
        os.replace(tmp, self.dir / f"rank{self.rank}.json")
        deadline = time.monotonic() + max(2.0, self.timeout / 2)  # the others trip within a poll or two
        while True:
            seen = {}
            for r in self.ranks:
                with contextlib.suppress(OSError, ValueError):
                    seen[r] = tuple(json.loads((self.dir / f"rank{r}.json").read_text()))
            if set(self.ranks) <= set(seen) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        silent = [r for r in self.ranks if r not in seen]
        least = min(seen.values())
        stuck = silent or sorted(r for r, v in seen.items() if v == least)
        who = f"rank{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))}"
        if self.rank in stuck or (silent and self.rank == min(seen)):
            print(f"error: {who} stuck at step {step}{' (not answering)' if silent else ''}: no progress for"
                  f" {late:.0f} s (step timeout {self.timeout:g} s); ending the run", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(self.timeout)  # torchrun stops this rank once the stuck one has exited
        print(f"error: rank {self.rank} waited {time.monotonic() - self.t0:.0f} s at step {step} for {who};"
              " ending the run", file=sys.stderr, flush=True)
        os._exit(3)
