"""Chrome trace-event JSON of a simulated step (opens in https://ui.perfetto.dev or chrome://tracing).

Format: the Trace Event Format's complete events (``ph: "X"``, ``ts``/``dur`` in microseconds)
plus metadata events (``ph: "M"``) naming each process and thread. Processes separate the roles
(student GPUs, teacher GPUs, links and storage) so teacher and student are distinguishable at a
glance; each thread is one track: one pipeline rank's compute stream, its gradient-sync stream,
or one direction of a link.
"""

from __future__ import annotations

import json
from typing import Any

from .step import SimResult

PIDS = {"student": (1, "student GPUs"), "teacher": (2, "teacher GPUs"), "link": (3, "links and storage")}


def chrome_trace(result: SimResult, track_labels: dict[str, str] | None = None,
                 title: str = "") -> dict[str, Any]:
    """Trace events for ``result``. ``track_labels`` renames tracks (e.g. with the GPUs they
    stand for); tracks without a label keep their simulator name."""
    labels = track_labels or {}
    tids: dict[str, tuple[int, int]] = {}
    meta: list[dict[str, Any]] = []
    for role, (pid, pname) in PIDS.items():
        if any(t.role == role for t in result.tracks):
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                         "args": {"name": f"{pname}{' - ' + title if title and role == 'student' else ''}"}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                         "args": {"sort_index": pid}})
    order = {"gpu": 0, "stream": 1, "link": 2}  # GPUs first, then their comm streams, then links
    tracks = sorted(result.tracks, key=lambda t: (order[t.kind], t.track))
    for n, t in enumerate(tracks, start=1):
        pid = PIDS[t.role][0]
        tids[t.track] = (pid, n)
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": n,
                     "args": {"name": labels.get(t.track, t.track)}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": n,
                     "args": {"sort_index": n}})
    events = []
    for e in result.events:
        pid, tid = tids[e.track]
        events.append({"name": e.name, "cat": e.category, "ph": "X", "ts": round(e.start_s * 1e6, 3),
                       "dur": round(e.duration_s * 1e6, 3), "pid": pid, "tid": tid})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms",
            "otherData": {"step_time_s": result.step_time_s, "title": title}}


def trace_json(result: SimResult, track_labels: dict[str, str] | None = None, title: str = "") -> str:
    return json.dumps(chrome_trace(result, track_labels, title), separators=(",", ":"))
