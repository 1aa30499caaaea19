"""A small discrete-event engine: tasks on in-order streams, with dependencies.

Every resource (a GPU's compute stream, a GPU's gradient-sync stream, one direction of a link)
runs its tasks in the order they were issued, as a CUDA stream or an NCCL communicator does; a
task starts when its stream is free and every dependency has reached its ready point. Because
the order on each stream is fixed by the schedule (1F1B is an order, not a greedy choice), the
simulation is a single topological pass (Kahn's algorithm) rather than a priority queue: each
task's start is ``max(stream free, dependencies ready)``, which is exactly what an event loop
with in-order streams would compute, in O(tasks + edges).

A dependency may be partial: ``(task, frac)`` is ready once ``frac`` of that task has run
(gradient buckets become ready while the last backward is still running).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Graph:
    """Tasks in issue order per track. Times in seconds, filled by ``run``."""

    track: list[int] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    cat: list[str] = field(default_factory=list)
    dur: list[float] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    deps: list[list[tuple[int, float]]] = field(default_factory=list)
    tracks: list[str] = field(default_factory=list)
    track_ids: dict[str, int] = field(default_factory=dict)
    queue: list[list[int]] = field(default_factory=list)  # per track, tasks in issue order
    start: list[float] = field(default_factory=list)
    binding: list[int] = field(default_factory=list)  # the dependency that set the start (-1: none)

    def add_track(self, name: str) -> int:
        if name not in self.track_ids:
            self.track_ids[name] = len(self.tracks)
            self.tracks.append(name)
            self.queue.append([])
        return self.track_ids[name]

    def add(self, track: str, name: str, cat: str, dur: float, step: int = 0) -> int:
        """Issue a task at the end of ``track``'s stream; returns its id."""
        if not dur >= 0:
            raise ValueError(f"task {name!r} on {track!r}: duration {dur} s must be >= 0")
        t = self.add_track(track)
        i = len(self.dur)
        self.track.append(t)
        self.name.append(name)
        self.cat.append(cat)
        self.dur.append(float(dur))
        self.step.append(step)
        self.deps.append([])
        self.queue[t].append(i)
        return i

    def after(self, task: int, dep: int, frac: float = 1.0) -> None:
        """``task`` may start once ``frac`` of ``dep`` has run."""
        self.deps[task].append((dep, frac))

    def end(self, i: int) -> float:
        return self.start[i] + self.dur[i]

    def run(self) -> None:
        """Compute every task's start time. Raises RuntimeError on a cyclic order (deadlock)."""
        n = len(self.dur)
        waiting = [len(d) for d in self.deps]
        users: list[list[int]] = [[] for _ in range(n)]
        for i, ds in enumerate(self.deps):
            for d, _ in ds:
                users[d].append(i)
        pos = [0] * len(self.tracks)  # next unscheduled index per track
        free = [0.0] * len(self.tracks)
        start = [0.0] * n
        binding = [-1] * n
        ready = deque(q[0] for q in self.queue if q and waiting[q[0]] == 0)
        count = 0
        while ready:
            i = ready.popleft()
            t = self.track[i]
            s, b = free[t], -1
            for d, frac in self.deps[i]:
                r = start[d] + frac * self.dur[d]
                if r > s:
                    s, b = r, d
            start[i], binding[i] = s, b
            free[t] = s + self.dur[i]
            count += 1
            pos[t] += 1
            q = self.queue[t]
            if pos[t] < len(q) and waiting[q[pos[t]]] == 0:
                ready.append(q[pos[t]])
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0 and self.queue[self.track[u]][pos[self.track[u]]] == u:
                    ready.append(u)
        if count != n:
            stuck = [self.tracks[t] + ": " + self.name[self.queue[t][pos[t]]]
                     for t in range(len(self.tracks)) if pos[t] < len(self.queue[t])]
            raise RuntimeError(f"schedule deadlock: {n - count} tasks never became ready; "
                               f"blocked heads: {', '.join(stuck[:4])}")
        self.start, self.binding = start, binding
