"""Event simulation of one training step from plain inputs (times per stage, micro-batches, ...).

What is simulated, per representative data-parallel replica (all dp replicas run the same
schedule on the same kind of GPUs, so one replica's pipeline ranks stand for all of them; each
track is one pipeline rank, i.e. tp x dp GPUs doing identical work):

- the student's micro-batches on each pipeline rank under GPipe, 1F1B or interleaved 1F1B
  (``schedules``), activations and gradients sent to the neighbouring rank on that direction of
  the link: asynchronous sends on their own stream (Megatron's overlapped p2p) or, with
  ``blocking_p2p``, on the sender's compute stream (Megatron 1F1B's blocking send/recv pairs,
  what the cost model prices; kdplan.sim.plan_sim uses it);
- the data-parallel gradient reduction on each rank's own comm stream, in buckets that become
  ready while the last backward of each model chunk runs (gradients accumulate across
  micro-batches, so only the last backward can hide it): only the tail is exposed when compute
  covers it; then the optimizer step, then (ZeRO) the parameter all-gather;
- the teacher: ``colocated`` runs its forward for micro-batch j on the same GPU right before the
  student's forward of j (time-sliced, split into the same chunks, its activations travelling
  with the student's from rank to rank);
  ``disaggregated`` runs on its own pipeline ranks and sends each output over the
  teacher->student link into one of the student's ``max_in_flight`` output buffers (a buffer
  frees when the student's loss has read it); each teacher stage holds one micro-batch, so the
  teacher runs at most ``max_in_flight`` + its pipeline depth micro-batches ahead of the loss;
  ``offline`` reads each micro-batch's cached outputs from storage, prefetching
  ``max_in_flight`` ahead.

Disaggregated and offline steps are simulated twice in a row and the second step is reported:
the teacher stream does not stop between steps, so only the steady state is a fair step time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .engine import Graph
from .schedules import rank_ops

STUDENT_COMPUTE = ("forward", "backward")
COMM_KINDS = ("pipeline", "gradients", "params", "teacher_outputs")
BUSY = ("forward", "backward", "teacher_forward", "optimizer")  # what counts towards utilization


@dataclass(frozen=True)
class StudentInput:
    """The student's pipeline. Times in seconds per micro-batch unless stated."""

    forward_s: Sequence[float]  # per virtual stage in model order (pp * virtual_stages)
    backward_s: Sequence[float]
    num_micro_batches: int
    pp: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (virtual stages = len(forward_s) / pp)
    p2p_s: Sequence[float] = ()  # per virtual stage: send of its output to the next (same back)
    dp_reduce_s: float | Sequence[float] = 0.0  # per rank per step: gradient collective time
    dp_buckets: int = 4  # gradient buckets per model chunk
    params_gather_s: float | Sequence[float] = 0.0  # per rank per step, after the optimizer
    optimizer_s: float = 0.0
    params_wait_s: float | Sequence[float] = 0.0  # per micro-batch (per rank): exposed ZeRO-3 gathers
    # Part of forward/backward that is tensor-parallel collectives (per rank; breakdown only).
    tp_share: float | Sequence[float] = 0.0


@dataclass(frozen=True)
class TeacherInput:
    """The teacher's forward stream, per *student* micro-batch (work rescaled to the student's)."""

    placement: str  # colocated | disaggregated | offline
    forward_s: Sequence[float] = ()  # per teacher rank (colocated: one per student rank)
    p2p_s: Sequence[float] = ()  # per teacher rank: send of its activations to the next
    transfer_s: float = 0.0  # teacher->student link (colocated, other layout; disaggregated) or storage read (offline)
    max_in_flight: int = 2


@dataclass
class Event:
    track: str
    name: str
    start_s: float
    duration_s: float
    category: str


@dataclass
class TrackStats:
    """One track over the reported step: busy time and idle time by cause."""

    track: str
    role: str  # student | teacher | link
    kind: str  # gpu | stream | link
    busy_s: float
    busy_by_category_s: dict[str, float]
    idle_s: dict[str, float]  # gpu tracks: bubble, pipeline, gradients, params, teacher_outputs, teacher_wait, student_wait


@dataclass
class SimResult:
    step_time_s: float
    events: list[Event]  # the reported step, times from its start
    tracks: list[TrackStats]
    breakdown_s: dict[str, float]  # of the busiest student GPU; sums to step_time_s
    critical_track: str
    teacher_wait_s: float  # step time lost waiting for the teacher stream (breakdown_s["teacher_wait"])
    utilization: dict[str, float] = field(default_factory=dict)  # busy fraction per role
    max_in_flight_stage0: int = 0  # student micro-batches forwarded but not yet backwarded on rank 0


def _per_rank(x: float | Sequence[float], p: int, what: str) -> list[float]:
    if isinstance(x, (int, float)):
        return [float(x)] * p
    if len(x) != p:
        raise ValueError(f"{what}: {len(x)} values for {p} pipeline ranks")
    return [float(v) for v in x]


def simulate_step(student: StudentInput, teacher: TeacherInput | None = None,
                  steps: int | None = None, blocking_p2p: bool = False) -> SimResult:
    """Simulate one optimizer step; see the module docstring for what is modelled.
    ``blocking_p2p``: every pipeline send (student's and teacher's) occupies its sender's
    compute stream instead of a link stream of its own."""
    place = teacher.placement if teacher else "none"
    if place not in ("none", "colocated", "disaggregated", "offline"):
        raise ValueError(f"unknown teacher placement {place!r}")
    b = _Builder(student, teacher, steps or (2 if place in ("disaggregated", "offline") else 1), blocking_p2p)
    for k in range(b.n_steps):
        for r in range(b.p):
            b.issue_rank(k, r)
        b.connect_step(k)
    loss = [b.F[k, j, b.V - 1] for k in range(b.n_steps) for j in range(b.m)]  # reads teacher outputs
    if place == "colocated" and teacher.transfer_s > 0:
        b.colocated_transfer(loss)
    elif place in ("disaggregated", "offline"):
        b.teacher_stream(loss)
    b.g.run()
    res = _analyse(b.g, b.n_steps, b.p, place, b.gpu)
    share = _per_rank(student.tp_share, b.p, "tp_share")[b.gpu.index(res.critical_track)]
    if share > 0:  # TP collectives run inside each forward/backward: split them out
        tp = res.breakdown_s["compute"] * share
        res.breakdown_s["compute"] -= tp
        res.breakdown_s["tensor_parallel"] = tp
    return res


class _Builder:
    """Issues a step's tasks on their streams in schedule order, then wires the dependencies.

    Keys: (step, micro_batch, virtual_stage) for forwards (F), backwards (B), their sends, and
    the colocated teacher's chunks (T); (step, rank) for the optimizer and parameter gathers."""

    def __init__(self, student: StudentInput, teacher: TeacherInput | None, n_steps: int,
                 blocking_p2p: bool = False):
        self.st, self.te, self.n_steps, self.blocking = student, teacher, n_steps, blocking_p2p
        self.p, self.m = student.pp, student.num_micro_batches
        self.V = len(student.forward_s)
        if self.p < 1 or self.V % self.p or len(student.backward_s) != self.V:
            raise ValueError(f"{self.V} forward / {len(student.backward_s)} backward stage times for pp={self.p}")
        self.v = self.V // self.p
        self.colocated = teacher is not None and teacher.placement == "colocated"
        if self.colocated and len(teacher.forward_s) != self.p:
            raise ValueError(f"colocated teacher needs one forward time per student rank ({self.p}), "
                             f"got {len(teacher.forward_s)}")
        self.p2p = list(student.p2p_s) or [0.0] * self.V
        self.dp_red = _per_rank(student.dp_reduce_s, self.p, "dp_reduce_s")
        self.gather = _per_rank(student.params_gather_s, self.p, "params_gather_s")
        self.wait = _per_rank(student.params_wait_s, self.p, "params_wait_s")
        self.ops = [rank_ops(student.schedule, self.m, self.p, self.v, r) for r in range(self.p)]
        self.g = Graph()
        self.gpu = [f"student s{r}" for r in range(self.p)]
        self.F: dict[tuple, int] = {}
        self.B: dict[tuple, int] = {}
        self.sendF: dict[tuple, int] = {}
        self.sendB: dict[tuple, int] = {}
        self.T: dict[tuple, int] = {}
        self.sendT: dict[tuple, int] = {}
        self.gath: dict[tuple, int] = {}

    def _link(self, a: int, b: int) -> str:
        """Where rank a's send to rank b runs: its own compute stream when sends block."""
        return self.gpu[a] if self.blocking else _link(a, b)

    def _tag(self, j: int, c: int) -> str:
        return str(j) if self.v == 1 else f"{j} c{c}"

    def issue_rank(self, k: int, r: int) -> None:
        """Rank r's compute stream in schedule order, with its sends, gradient buckets and optimizer."""
        g, st, p, V, gpu = self.g, self.st, self.p, self.V, self.gpu[r]
        last_b = {c: i for i, (kind, _, c) in enumerate(self.ops[r]) if kind == "B"}
        buckets = []
        for i, (kind, j, c) in enumerate(self.ops[r]):
            s, tag = c * p + r, self._tag(j, c)
            if kind == "F":
                if self.colocated:  # the teacher is split into the same v chunks
                    self.T[k, j, s] = g.add(gpu, f"teacher F{tag}", "teacher_forward", self.te.forward_s[r] / self.v, k)
                    if s < V - 1 and p > 1 and self.te.p2p_s and self.te.p2p_s[r] > 0:
                        self.sendT[k, j, s] = g.add(self._link(r, (r + 1) % p), f"teacher act {tag}", "pipeline",
                                                    self.te.p2p_s[r], k)
                if self.wait[r] > 0 and c == 0:
                    g.add(gpu, f"gather params {j}", "params", self.wait[r], k)
                self.F[k, j, s] = g.add(gpu, f"F{tag}", "forward", st.forward_s[s], k)
                if s < V - 1 and p > 1:
                    self.sendF[k, j, s] = g.add(self._link(r, (r + 1) % p), f"act {tag}", "pipeline", self.p2p[s], k)
                continue
            self.B[k, j, s] = g.add(gpu, f"B{tag}", "backward", st.backward_s[s], k)
            if s > 0 and p > 1:
                self.sendB[k, j, s] = g.add(self._link(r, (r - 1) % p), f"grad {tag}", "pipeline", self.p2p[s - 1], k)
            if i == last_b[c] and self.dp_red[r] > 0:  # gradients of chunk c are final: reduce them
                n = max(1, st.dp_buckets)
                for bi in range(n):
                    t = g.add(f"{gpu} grad-sync", f"reduce c{c} bucket {bi + 1}/{n}", "gradients",
                              self.dp_red[r] / self.v / n, k)
                    g.after(t, self.B[k, j, s], (bi + 1) / n)
                    buckets.append(t)
        opt = g.add(gpu, "optimizer", "optimizer", st.optimizer_s, k)
        for t in buckets:
            g.after(opt, t)
        if self.gather[r] > 0:
            self.gath[k, r] = g.add(f"{gpu} grad-sync", "param all-gather", "params", self.gather[r], k)
            g.after(self.gath[k, r], opt)

    def connect_step(self, k: int) -> None:
        """Data dependencies of step k: activations forward, gradients back, teacher alongside."""
        g, F, B, V, p = self.g, self.F, self.B, self.V, self.p
        for j in range(self.m):
            for s in range(V):
                if s > 0:
                    g.after(F[k, j, s], self.sendF[k, j, s - 1] if p > 1 else F[k, j, s - 1])
                g.after(B[k, j, s], F[k, j, s])
                if s < V - 1:
                    g.after(B[k, j, s], self.sendB[k, j, s + 1] if p > 1 else B[k, j, s + 1])
                if (k, j, s) in self.sendF:
                    g.after(self.sendF[k, j, s], F[k, j, s])
                if (k, j, s) in self.sendB:
                    g.after(self.sendB[k, j, s], B[k, j, s])
            if self.colocated:  # teacher and student activations travel as one message
                T, sendT = self.T, self.sendT
                for s in range(1, V):
                    g.after(T[k, j, s], sendT.get((k, j, s - 1), T[k, j, s - 1]))
                    g.after(T[k, j, s], self.sendF[k, j, s - 1] if p > 1 else F[k, j, s - 1])
                    if (k, j, s - 1) in sendT:
                        g.after(sendT[k, j, s - 1], T[k, j, s - 1])
        for r in range(p):
            if k > 0 and (k - 1, r) in self.gath:  # ZeRO: the next forward needs the gathered parameters
                g.after(F[k, 0, r], self.gath[k - 1, r])

    def colocated_transfer(self, loss: list[int]) -> None:
        """Colocated teacher with another layout: its outputs are redistributed before the loss."""
        for gidx, lt in enumerate(loss):
            k, j = divmod(gidx, self.m)
            x = self.g.add("link teacher->student", f"teacher out {j}", "teacher_outputs", self.te.transfer_s, k)
            self.g.after(x, self.T[k, j, self.V - 1])
            self.g.after(lt, x)

    def teacher_stream(self, loss: list[int]) -> None:
        """Disaggregated teacher pipeline (or offline storage reads) feeding a bounded queue."""
        g, te = self.g, self.te
        K = max(1, te.max_in_flight)
        tr = te.forward_s if te.placement == "disaggregated" else ()
        pt = len(tr)
        where = "link teacher->student" if te.placement == "disaggregated" else "storage->student"
        # The stream runs on past the last simulated step as far as the queue lets it, so the
        # teacher's work in the reported step is what it would be in the steady state.
        for gidx in range(len(loss) + K + pt):
            k, j = divmod(gidx, self.m)
            if gidx >= len(loss) and (pt == 0 or gidx - K - pt >= len(loss)):
                break
            prev = -1
            for i in range(pt):
                t = g.add(f"teacher s{i}", f"teacher F{j}", "teacher_forward", tr[i], k)
                if prev >= 0:
                    g.after(t, prev)
                elif gidx >= K + pt:  # each teacher stage holds one micro-batch, the student K
                    g.after(t, loss[gidx - K - pt])
                prev = t
                if i < pt - 1 and te.p2p_s and te.p2p_s[i] > 0:
                    where_p2p = f"teacher s{i}" if self.blocking else f"link teacher s{i}->s{i + 1}"
                    prev = g.add(where_p2p, f"teacher act {j}", "pipeline", te.p2p_s[i], k)
                    g.after(prev, t)
            if gidx - K >= len(loss):
                continue  # its buffer never frees within the simulated steps
            x = g.add(where, f"teacher out {j}", "teacher_outputs", te.transfer_s, k)
            if prev >= 0:
                g.after(x, prev)
            if gidx >= K:  # bounded queue: the student has K output buffers
                g.after(x, loss[gidx - K])
            if gidx < len(loss):
                g.after(loss[gidx], x)


def _link(a: int, b: int) -> str:
    return f"link s{a}->s{b}"


def _role(track: str) -> tuple[str, str]:
    if track.startswith("link") or track.startswith("storage"):
        return "link", "link"
    role = track.split()[0]
    return role, ("stream" if track.endswith("grad-sync") else "gpu")


def _cause(g: Graph, b: int, gap: float, own_role: str) -> list[tuple[str, float]]:
    """Why a GPU idled for ``gap`` seconds before a task whose start was set by task ``b``."""
    if b < 0:
        return [("bubble", gap)]
    cat, role = g.cat[b], _role(g.tracks[g.track[b]])[0]
    if cat in COMM_KINDS:
        comm = min(gap, g.dur[b])
        rest = "teacher_wait" if cat == "teacher_outputs" else "bubble"
        return [(cat, comm), (rest, gap - comm)]
    if own_role == "student" and role == "teacher":
        return [("teacher_wait", gap)]
    if own_role == "teacher" and role == "student":
        return [("student_wait", gap)]  # the output queue is full
    return [("bubble", gap)]


def _analyse(g: Graph, n_steps: int, p: int, place: str, gpu: list[str]) -> SimResult:
    t_end = [0.0] * n_steps
    for i in range(len(g.dur)):
        if _role(g.tracks[g.track[i]])[0] == "student":
            t_end[g.step[i]] = max(t_end[g.step[i]], g.end(i))
    w0 = t_end[-2] if n_steps > 1 else 0.0
    w1 = t_end[-1]
    step = w1 - w0

    events: list[Event] = []
    stats: list[TrackStats] = []
    for t, name in enumerate(g.tracks):
        role, kind = _role(name)
        busy: dict[str, float] = defaultdict(float)
        idle: dict[str, float] = defaultdict(float)
        prev_end = w0
        for i in g.queue[t]:
            s, e = g.start[i], g.end(i)
            lo, hi = max(s, w0), min(e, w1)
            if kind == "gpu":
                glo, ghi = max(prev_end, w0), min(s, w1)
                if ghi > glo:
                    for cause, sec in _cause(g, g.binding[i], ghi - glo, role):
                        if sec > 0:
                            idle[cause] += sec
            prev_end = max(prev_end, e)
            if hi > lo:
                busy[g.cat[i]] += hi - lo
                events.append(Event(name, g.name[i], lo - w0, hi - lo, g.cat[i]))
        if kind == "gpu" and w1 > max(prev_end, w0):
            idle["bubble"] += w1 - max(prev_end, w0)
        if role == "teacher" and n_steps > 1:
            busy, idle = _streamed(g, t, n_steps - 1, step, idle)
        stats.append(TrackStats(name, role, kind, sum(busy.values()), dict(busy), dict(idle)))

    by_name = {s.track: s for s in stats}
    # The breakdown is the busiest student GPU's (the closed form's slowest stage): busy + idle
    # of any GPU is the step.
    crit = max((by_name[t] for t in gpu), key=lambda t: sum(t.busy_by_category_s.get(c, 0.0) for c in BUSY))
    wait = by_name[gpu[p - 1]].idle_s.get("teacher_wait", 0.0)  # the loss rank's direct wait
    bd = {"compute": sum(crit.busy_by_category_s.get(c, 0.0) for c in STUDENT_COMPUTE)}
    for c in ("teacher_forward", "optimizer", "params"):
        if crit.busy_by_category_s.get(c):
            bd[c] = crit.busy_by_category_s[c]
    # What the critical GPU did not spend computing is split by the critical path: the
    # communication on it is exposed; teacher-side work on it is teacher wait; the rest is bubble.
    on_path = _critical_path(g, w0, w1)
    rest = step - sum(bd.values())
    comm = {c: on_path[c] for c in COMM_KINDS if on_path.get(c, 0.0) > 0 and c != "params"}
    scale = min(1.0, max(0.0, rest) / sum(comm.values())) if comm else 1.0
    for c, sec in comm.items():
        bd[c] = sec * scale  # (scaled down only where path comm overlapped the critical GPU's work)
    rest -= sum(comm.values()) * scale
    tw = min(max(0.0, rest), on_path.get("teacher", 0.0) + (wait if comm.get("teacher_outputs") else 0.0))
    tw = tw if tw > 1e-12 * max(step, 1.0) else 0.0
    if tw > 0:
        bd["teacher_wait"] = tw
    if rest - tw > 1e-12 * max(step, 1.0):
        bd["bubble"] = rest - tw

    util: dict[str, float] = {}
    for role in ("student", "teacher"):
        gs = [s for s in stats if s.role == role and s.kind == "gpu"]
        if gs and step > 0:
            util[role] = sum(sum(s.busy_by_category_s.get(c, 0.0) for c in BUSY) for s in gs) / (len(gs) * step)

    return SimResult(step_time_s=step, events=events, tracks=stats, breakdown_s=bd,
                     critical_track=crit.track, teacher_wait_s=bd.get("teacher_wait", 0.0), utilization=util,
                     max_in_flight_stage0=_in_flight(g, gpu[0], n_steps - 1))


def _streamed(g: Graph, t: int, k: int, step: float, idle: dict[str, float]):
    """A streaming teacher stage does not flush between steps, so the work that happens to fall
    inside the reported window is not one step's worth: count the reported step's own work,
    and split the rest of the step like the window's idle time."""
    busy: dict[str, float] = defaultdict(float)
    for i in g.queue[t]:
        if g.step[i] == k:
            busy[g.cat[i]] += g.dur[i]
    rest = max(0.0, step - sum(busy.values()))
    total = sum(idle.values())
    return busy, ({c: rest * x / total for c, x in idle.items()} if total else {"bubble": rest})


def _critical_path(g: Graph, w0: float, w1: float) -> dict[str, float]:
    """Seconds of the critical path inside [w0, w1], by category ("teacher": teacher-GPU work).

    Walks back from the task that ends last: each task's start was set either by the dependency
    recorded in ``binding`` or by the task before it on its own stream."""
    where = {i: (t, n) for t, q in enumerate(g.queue) for n, i in enumerate(q)}
    cur = max(range(len(g.dur)), key=lambda i: (g.end(i) if g.end(i) <= w1 + 1e-12 else -1.0, -i))
    until = g.end(cur)
    out: dict[str, float] = defaultdict(float)
    while cur >= 0 and until > w0:
        lo = max(g.start[cur], w0)
        cat = g.cat[cur]
        if _role(g.tracks[g.track[cur]])[0] == "teacher":
            cat = "teacher"
        out[cat] += max(0.0, until - lo)
        b = g.binding[cur]
        if b >= 0:
            frac = next(f for d, f in g.deps[cur] if d == b)
            cur, until = b, g.start[b] + frac * g.dur[b]
        else:
            t, n = where[cur]
            cur, until = (g.queue[t][n - 1], g.start[cur]) if n > 0 else (-1, 0.0)
    return out


def _in_flight(g: Graph, track: str, step: int) -> int:
    """Most micro-batches forwarded (any chunk) but not fully backwarded on one rank."""
    live: dict[str, int] = defaultdict(int)
    now = most = 0
    for i in g.queue[g.track_ids[track]]:
        if g.step[i] != step or g.cat[i] not in STUDENT_COMPUTE:
            continue
        mb = g.name[i].split()[0][1:]
        before = live[mb]
        live[mb] += 1 if g.cat[i] == "forward" else -1
        now += (live[mb] > 0) - (before > 0)
        most = max(most, now)
    return most
