"""Whole-job prices: several students, epochs, and an offline cache of teacher outputs.

The step plans of each phase (a student's step, reading the cache or with the teacher online;
the teacher's forward per step; the mirror baseline's step) come from the single-step planner:
``kdplan.search.job`` asks for them and hands the numbers in. This module only adds them up over
the job, with the storage traffic the step plans do not see (the one-off cache write), and says
when a cache does not fit. It never imports the chooser.

Units: seconds, bytes, tokens. ``steps = tokens / tokens_per_step``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schema.cluster import ClusterProfile, StorageTier
from ..schema.compression import Compression

TB = 1e12


@dataclass(frozen=True)
class Storage:
    """A storage tier as the job sees it: capacity and bandwidth over the nodes it spans."""

    name: str
    capacity_bytes: float
    read_bytes_per_s: float  # what all the job's readers together get
    write_bytes_per_s: float
    per_node_read_gb_per_s: float  # what one node's reader gets (offline_read_gb_per_s when it holds the cache)
    capacity_measured: str | None = None  # StorageTier.capacity_measured: the capacity is measured free space


def storage_tiers(cluster: ClusterProfile) -> list[Storage]:
    """The cluster's tiers that can hold a cache: node-local storage over all nodes (each node
    holds and reads its own shard of the cache: the data order is shuffled within a node's
    shard), then the shared file system (its bandwidth shared by all nodes)."""
    nodes = sum(g.num_nodes for g in cluster.groups)
    out = []
    local = [g.node.local_storage for g in cluster.groups]
    if all(t is not None for t in local):
        # The slowest and smallest node bounds a sharded cache: shards are equal.
        t: StorageTier = min(local, key=lambda t: (t.capacity_tb, t.read_gb_per_s))
        name = t.name if t.name.startswith("node-local") else f"node-local {t.name}"
        out.append(Storage(name, t.capacity_tb * TB * nodes, t.read_gb_per_s * 1e9 * nodes,
                           min(x.write_gb_per_s for x in local) * 1e9 * nodes, t.read_gb_per_s,
                           t.capacity_measured))
    s = cluster.shared_storage
    if s is not None:
        out.append(Storage(s.name, s.capacity_tb * TB, s.read_gb_per_s * 1e9, s.write_gb_per_s * 1e9,
                           s.read_gb_per_s / nodes, s.capacity_measured))
    return out


def offline_read_gb_per_s(cluster: ClusterProfile) -> float | None:
    """GB/s one node reads offline KD's teacher outputs at: the first of ``storage_tiers`` (node-local
    storage, else the shared file system, at its per-node share), the tier a step plan's cache is
    on (kdplan.search.job leaves only the tier it chose). None: the profile lists no storage."""
    tiers = storage_tiers(cluster)
    return tiers[0].per_node_read_gb_per_s if tiers else None


def cluster_price_per_hour(cluster: ClusterProfile, price_per_gpu_hour: float | None = None) -> float | None:
    """Dollars per hour for the whole cluster: the override for every GPU, else the profile's."""
    total = 0.0
    for g in cluster.groups:
        n = g.num_nodes * g.node.gpus_per_node
        p = price_per_gpu_hour if price_per_gpu_hour is not None else cluster.gpus[g.node.gpu].price_per_hour_usd
        if p is None:
            return None
        total += n * p
    return total


def cache_bytes(tokens: float, fmt: Compression, vocab_size: int, dense_value_bytes: int) -> float:
    """Bytes of a cache holding ``tokens`` positions of teacher outputs in format ``fmt``."""
    return tokens * fmt.bytes_per_token(vocab_size, dense_value_bytes)


def fits(storage: Storage, nbytes: float, fmt: Compression, tokens: float) -> str | None:
    """None if the cache fits the tier, else what binds, in one line (a measured capacity says it
    is the free space of a path on a day, and how to plan with another)."""
    if nbytes <= storage.capacity_bytes:
        return None
    why = (f" (the {storage.capacity_measured}, as kdplan profile measured it: set capacity_tb in a copy of the"
           " cluster profile, --cluster FILE, to what the cache may use)" if storage.capacity_measured else "")
    return (f"the {fmt} cache of {tokens:.3g} tokens needs {nbytes / TB:.4g} TB; the {storage.name} holds "
            f"{storage.capacity_bytes / TB:.4g} TB{why}")


@dataclass
class Phase:
    name: str
    duration_s: float
    gpus: int
    detail: str = ""
    parallel_with_previous: bool = False  # side by side with the phase before it
    offset_s: float = 0.0  # starts this long after the side-by-side group it belongs to


@dataclass
class JobPrice:
    """One strategy's whole job."""

    strategy: str
    phases: list[Phase] = field(default_factory=list)
    teacher_passes: float = 0.0
    cache_bytes: float = 0.0
    cache_format: Compression | None = None
    cache_storage: str | None = None
    student_steps_s: list[float] = field(default_factory=list)
    student_gpus: list[int] | None = None  # side by side on disjoint groups of these sizes
    teacher_gpus: int | None = None  # the teacher's own group (disaggregated_fanout)
    in_turn: bool = False  # every student in turn within each step on the same GPUs, in one run
    writer: str | None = None  # online_then_cache: the student whose online first epoch writes the cache

    @property
    def total_time_s(self) -> float:
        """Phases run one after another, except those marked side by side with the one before
        (which start ``offset_s`` after the first of their group)."""
        total, run = 0.0, 0.0
        for p in self.phases:
            if p.parallel_with_previous:
                run = max(run, p.offset_s + p.duration_s)
            else:
                total += run
                run = p.offset_s + p.duration_s
        return total + run

    def timeline(self) -> list[tuple[Phase, float]]:
        """(phase, start_s) in order."""
        out, start, run = [], 0.0, 0.0
        for p in self.phases:
            if not p.parallel_with_previous:
                start += run
                run = 0.0
            out.append((p, start + p.offset_s))
            run = max(run, p.offset_s + p.duration_s)
        return out


def separate(names: list[str], step_s: list[float], steps: float, gpus: int, strategy: str,
             teacher_passes: float) -> JobPrice:
    """Each student its own job, one after another on all the GPUs, the teacher recomputed in
    every step (the separate-mirror baseline, or kdplan's own step plan per student)."""
    return JobPrice(strategy, [Phase(n, s * steps, gpus, f"{steps:.4g} steps of {s:.4g} s, teacher online")
                               for n, s in zip(names, step_s)],
                    teacher_passes=teacher_passes, student_steps_s=list(step_s))


def online_fanout(names: list[str], teacher_step_s: float, student_steps_s: list[float], steps: float,
                  gpus: int, teacher_passes: float) -> JobPrice:
    """The teacher runs once per batch on all the GPUs and its outputs feed every student in
    turn on the same GPUs: a step costs the teacher's forward plus every student's step."""
    step = teacher_step_s + sum(student_steps_s)
    detail = (f"{steps:.4g} steps of {step:.4g} s: teacher forward {teacher_step_s:.4g} s + "
              + " + ".join(f"{n} {s:.4g} s" for n, s in zip(names, student_steps_s)))
    return JobPrice("online_fanout", [Phase("teacher + " + ", ".join(names), step * steps, gpus, detail)],
                    teacher_passes=teacher_passes, student_steps_s=list(student_steps_s))


def offline(names: list[str], teacher_step_s: float, student_steps_s: list[float], cache_tokens: float,
            steps: float, tokens_per_step: float, fmt: Compression, bytes_per_token: float,
            storage: Storage, gpus: int, student_gpus: list[int] | None = None) -> JobPrice:
    """One teacher pass over the unique tokens writes the cache (the pass streams: it takes the
    longer of the teacher's compute and the write), then every student runs all its steps
    reading it (its step plan prices the read at the tier's per-node bandwidth): one after
    another on all the GPUs, or, with ``student_gpus``, side by side on disjoint groups of
    that many GPUs (the job lasts until the slowest finishes)."""
    nbytes = cache_tokens * bytes_per_token
    phases = [_writing_phase("teacher pass", "forward", teacher_step_s, cache_tokens, tokens_per_step, fmt,
                             bytes_per_token, storage, gpus, "the teacher's compute")]
    for i, (n, s) in enumerate(zip(names, student_steps_s)):
        g = student_gpus[i] if student_gpus else gpus
        phases.append(Phase(n, s * steps, g, f"{steps:.4g} steps of {s:.4g} s reading the cache"
                            + (" (side by side)" if student_gpus else ""),
                            parallel_with_previous=bool(student_gpus) and i > 0))
    return JobPrice("offline", phases, teacher_passes=1.0, cache_bytes=nbytes, cache_format=fmt,
                    cache_storage=storage.name, student_steps_s=list(student_steps_s),
                    student_gpus=list(student_gpus) if student_gpus else None)


def _writing_phase(name: str, what: str, step_s: float, cache_tokens: float, tokens_per_step: float,
                   fmt: Compression, bytes_per_token: float, storage: Storage, gpus: int, binder: str) -> Phase:
    """A pass over ``cache_tokens`` that writes their teacher outputs as it goes: the write streams
    behind the step (a host writer), so a step takes the longer of ``step_s`` (``what``; ``binder``
    when it binds) and its write."""
    steps = cache_tokens / tokens_per_step
    write_s = tokens_per_step * bytes_per_token / storage.write_bytes_per_s
    step = max(step_s, write_s)
    binds = "the write" if write_s > step_s else binder
    return Phase(name, step * steps, gpus,
                 f"writes {cache_tokens * bytes_per_token / TB:.4g} TB ({fmt}) to {storage.name}; {steps:.4g} steps "
                 f"of {step:.4g} s ({binds} binds: write {write_s:.3g} s, {what} {step_s:.4g} s)")


def offline_in_turn(names: list[str], teacher_step_s: float, student_steps_s: list[float], read_s: float,
                    compute_s: list[float], cache_tokens: float, steps: float, tokens_per_step: float,
                    fmt: Compression, bytes_per_token: float, storage: Storage, gpus: int) -> JobPrice:
    """``offline`` with every student in one run on all the GPUs (executor.train.CoStudent): one
    teacher pass writes the cache, then each step reads the batch's cached targets once (``read_s``,
    cost.compose.offline_read_s) and trains every student in turn. The read is prefetched across
    steps, so only what exceeds the students' compute together (``compute_s``) is exposed, once
    per step. ``student_steps_s``: each student's step without the read."""
    exposed = max(0.0, read_s - sum(compute_s))
    step = sum(student_steps_s) + exposed
    detail = (f"{steps:.4g} steps of {step:.4g} s: " + " + ".join(f"{n} {s:.4g} s" for n, s in zip(names, student_steps_s))
              + f", one read of {read_s:.3g} s per step for all ({exposed:.3g} s exposed)")
    phases = [_writing_phase("teacher pass", "forward", teacher_step_s, cache_tokens, tokens_per_step, fmt,
                             bytes_per_token, storage, gpus, "the teacher's compute"),
              Phase(" + ".join(names) + " in turn, reading the cache", step * steps, gpus, detail)]
    return JobPrice("offline", phases, teacher_passes=1.0, cache_bytes=cache_tokens * bytes_per_token,
                    cache_format=fmt, cache_storage=storage.name, student_steps_s=list(student_steps_s), in_turn=True)


def online_then_cache(names: list[str], writer: int, online_step_s: float, read_steps_s: list[float],
                      cache_tokens: float, steps: float, tokens_per_step: float, fmt: Compression,
                      bytes_per_token: float, storage: Storage, gpus: int) -> JobPrice:
    """The mix: student ``writer`` runs its first epoch (``cache_tokens``, the unique tokens) with
    the teacher online, co-located (``online_step_s``, its step with the teacher's outputs in the
    cache's format ``fmt``), and writes the teacher's outputs to the cache as it trains (the write
    streams behind the step: a step takes the longer of the two). There is no separate teacher
    pass. Its later epochs and every other student read the cache (``read_steps_s``: each
    student's step reading it), one after another on all the GPUs."""
    first = cache_tokens / tokens_per_step
    w = names[writer]
    phases = [_writing_phase(f"{w} epoch 1, teacher online", "online KD step", online_step_s, cache_tokens,
                             tokens_per_step, fmt, bytes_per_token, storage, gpus, "the online KD step")]
    if steps > first:
        phases.append(Phase(f"{w} later epochs", (steps - first) * read_steps_s[writer], gpus,
                            f"{steps - first:.4g} steps of {read_steps_s[writer]:.4g} s reading the cache"))
    phases += [Phase(n, s * steps, gpus, f"{steps:.4g} steps of {s:.4g} s reading the cache")
               for i, (n, s) in enumerate(zip(names, read_steps_s)) if i != writer]
    own = list(read_steps_s)
    own[writer] = sum(p.duration_s for p in phases[:2 if steps > first else 1]) / steps  # its mean step
    return JobPrice("online_then_cache", phases, teacher_passes=1.0, cache_bytes=cache_tokens * bytes_per_token,
                    cache_format=fmt, cache_storage=storage.name, student_steps_s=own, writer=w)


def sequence_level(names: list[str], generation_step_s: float, student_steps_s: list[float], unique_tokens: float,
                   steps: float, tokens_per_step: float, storage: Storage | None, gpus: int) -> JobPrice:
    """Sequence-level KD (kdplan.cost.generation): one teacher pass generates the unique tokens
    of the corpus and writes their ids (TOKEN_ID_BYTES each; the pass takes the longer of the
    generation and the write, which streams behind it), then every student runs all its
    cross-entropy steps on the text, one after another on all the GPUs. ``storage`` None: the
    profile names no storage tier, and the write is not priced (said in the phase)."""
    from .generation import TOKEN_ID_BYTES
    pass_steps = unique_tokens / tokens_per_step
    nbytes = unique_tokens * TOKEN_ID_BYTES
    write_s = tokens_per_step * TOKEN_ID_BYTES / storage.write_bytes_per_s if storage else 0.0
    pass_step = max(generation_step_s, write_s)
    where = f"to {storage.name}" if storage else "(no storage tier in the profile: the write is not priced)"
    phases = [Phase("teacher generation", pass_step * pass_steps, gpus,
                    f"generates {unique_tokens:.4g} tokens, writes their ids ({nbytes / TB:.4g} TB) {where}; "
                    f"{pass_steps:.4g} steps' worth of {generation_step_s:.4g} s")]
    phases += [Phase(n, s * steps, gpus, f"{steps:.4g} steps of {s:.4g} s, cross-entropy on the teacher's text")
               for n, s in zip(names, student_steps_s)]
    return JobPrice("sequence", phases, teacher_passes=1.0, cache_bytes=nbytes,
                    cache_storage=storage.name if storage else None, student_steps_s=list(student_steps_s))


def fanout_transfer_s(tokens_per_step: float, bytes_per_token: float, teacher_gpus: int,
                      student_gpus: list[int], lane_bytes_per_s: float, latency_s: float = 0.0) -> float:
    """Per step, the teacher group's outputs to every student group (disaggregated_fanout): the
    teacher's GPUs send one copy of the step's outputs to each of the n students, over one lane
    (one NIC, or one GPU's link inside a node) per teacher GPU, and student i receives its copy
    over its own ``student_gpus[i]`` lanes; the slower end binds. ``lane_bytes_per_s``: what
    one lane achieves for point-to-point sends (kdplan.cost.comm.op_bandwidth(link, "send_recv"))."""
    copy = tokens_per_step * bytes_per_token
    send = len(student_gpus) * copy / (teacher_gpus * lane_bytes_per_s)
    recv = max(copy / (g * lane_bytes_per_s) for g in student_gpus)
    return latency_s + max(send, recv)


def disaggregated_fanout(names: list[str], teacher_gpus: int, teacher_step_s: float, student_steps_s: list[float],
                         student_gpus: list[int], transfer_s: float, steps: float, teacher_passes: float,
                         link: str = "") -> JobPrice:
    """The teacher on its own ``teacher_gpus`` GPUs runs once per batch and streams its outputs
    to every student, the students side by side on disjoint groups of ``student_gpus``: a
    pipeline whose step is the slowest of the teacher's forward, every student's step (without
    reading a cache) and the outputs' transfer (fanout_transfer_s), plus one teacher forward and
    one transfer to fill it. Every student trains on every batch, so all run at that step and
    finish together."""
    step = max(teacher_step_s, transfer_s, *student_steps_s)
    parts = {"the teacher's forward": teacher_step_s, "the outputs' transfer": transfer_s,
             **{f"{n}'s step": s for n, s in zip(names, student_steps_s)}}
    binds = max(parts, key=parts.get)
    fill = teacher_step_s + transfer_s
    total = fill + step * steps
    over = f" over {link}" if link else ""
    phases = [Phase("teacher (own GPUs, online)", total, teacher_gpus,
                    f"{steps:.4g} forwards of {teacher_step_s:.4g} s, each step's outputs sent to {len(names)} "
                    f"students{over} ({transfer_s:.3g} s per step); {binds} binds the {step:.4g} s step")]
    for i, (n, s, g) in enumerate(zip(names, student_steps_s, student_gpus)):
        # each student starts once the first batch's outputs arrived (the fill)
        phases.append(Phase(n, step * steps, g, f"{steps:.4g} steps of {step:.4g} s (its own {s:.4g} s), "
                            "side by side, from the teacher's stream", parallel_with_previous=True, offset_s=fill))
    return JobPrice("disaggregated_fanout", phases, teacher_passes=teacher_passes,
                    student_steps_s=list(student_steps_s), student_gpus=list(student_gpus),
                    teacher_gpus=teacher_gpus)
