"""Candidates (the search's first stage, enumerate): what the solver may choose from, before any
price. Placement arrangements (``arrangements``: mode, placement and the GPUs and cluster groups of
each role), every valid layout of one role on its GPUs that the pins allow (``role_options``) and
the teacher-output formats (``compressions``). kdplan.search.space prices them into ILP blocks.

Only valid layouts are emitted (the ILP never sees an invalid one):
- tp divides the query heads and the KV heads, and stays inside a node;
- pp divides the layer count (the student may also take an uneven split,
  ``kdplan.schema.layers.split_layers``: the first and last stages lighter, because they also
  carry the embedding and the LM head with the KD loss);
- dp * tp * pp equals the role's GPUs and dp divides the global batch;
- micro_batch divides the per-replica batch (capped at ``MAX_MICRO_BATCH``: beyond it GEMMs are
  saturated and activations only grow);
- student: ZeRO 0-3 (0 only when dp = 1), recompute none|selective|full, sequence parallel only
  with tp > 1, 2 virtual stages only with pp > 1 and micro-batches divisible by pp, 8-bit
  gradient compression only when the dp group crosses nodes, optimizer offload only when the
  model states alone exceed ``OFFLOAD_STATES_FRACTION`` of HBM (pruning rules: elsewhere they
  cannot pay for their cost);
- teacher: forward only, so no gradients, optimizer or recomputation; ZeRO 0 or 3 (weight
  sharding over its dp group), weights in HBM or offloaded to host; forward precision bf16
  (exact) or fp8/int8 (quantized weights) among ``teacher_precisions``: the job's
  --teacher-precision / teacher.precision pin, restricted to what the role's GPUs support
  (kdplan.teacher_precision).

``--fix`` pins (``problem.pins``) filter here through ``kdplan.pins.pin_allows``; a pin nothing
satisfies is named by ``kdplan.pins.check_layout_pins``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..pins import arrangement_allowed, pin_allows
from ..schema.compression import VALUE_BITS, Compression
from ..schema.layers import split_layers
from ..schema.model import ModelSpec
from ..schema.plan import Layout
from .mixed import teacher_gpu_counts

MAX_MICRO_BATCH = 16
OFFLOAD_STATES_FRACTION = 0.25  # consider optimizer offload once the states exceed this share of HBM
TOPK_LEVELS = (8, 16, 32, 64, 128, 256, 1024)
_GIB = 2**30


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Option:
    """One layout of one role with its pipeline split (the unit the ILP selects)."""

    layout: Layout
    stage_layers: tuple[int, ...] | None = None  # None: even split
    stage_groups: tuple[int, ...] | None = None  # cluster group of each stage (mixed clusters)

    def key(self) -> tuple:
        lo = self.layout
        return (lo.tp, lo.pp, lo.dp, lo.zero, lo.micro_batch, lo.recompute, lo.sequence_parallel,
                lo.virtual_stages, lo.offload, lo.grad_compression, self.stage_layers, self.stage_groups,
                lo.forward_precision)


def state_bytes_lower_bound(model: ModelSpec, lo: Layout, role: str, precision_bytes: int = 2) -> float:
    """A memory floor per GPU (bytes) that needs no pricing: the model states alone.

    Student: 16 B/param of mixed-precision Adam (formulas.md section 2) sharded by ZeRO; teacher:
    weights only. Used to discard layouts before pricing; the cost model has the final word.
    """
    params = model.num_params() / (lo.tp * lo.pp)
    if role == "teacher":
        if lo.offload == "weights":
            return 0.0
        per = precision_bytes if lo.forward_precision == "bf16" else 1  # quantized: >= 1 B/param
        return params * per / (lo.dp if lo.zero == 3 else 1)
    d = lo.dp
    w, g, o = precision_bytes * params, precision_bytes * params, 12 * params
    if lo.offload == "optimizer":
        o = 0.0
    if lo.zero >= 1:
        o /= d
    if lo.zero >= 2:
        g /= d
    if lo.zero >= 3:
        w /= d
    return w + g + o


def role_options(model: ModelSpec, role: str, n_gpus: int, *, gpus_per_node: int, global_batch: int,
                 memory_gib: float, pins: dict, precision_bytes: int = 2,
                 allow_cross_node_tp: bool = False, teacher_precisions: tuple[str, ...] = ("bf16",)) -> list[Option]:
    """All valid layouts of ``role`` on ``n_gpus`` GPUs that satisfy the pins and whose model
    states alone fit in ``memory_gib`` per GPU (a teacher at each of ``teacher_precisions``)."""
    out: list[Option] = []
    heads = (model.num_heads, model.num_kv_heads)
    L = model.num_layers
    for tp in divisors(n_gpus):
        if any(h % tp for h in heads) or (tp > gpus_per_node and not allow_cross_node_tp):
            continue
        for pp in divisors(n_gpus // tp):
            if pp > L:
                continue
            even = L % pp == 0
            if not even and (role == "teacher" or pp > L // 2):
                continue
            dp = n_gpus // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            for mb in divisors(per_replica):
                if mb > MAX_MICRO_BATCH:
                    break
                m = per_replica // mb
                out.extend(_variants(model, role, tp, pp, dp, mb, m, even, n_gpus, memory_gib, pins,
                                     precision_bytes, gpus_per_node, teacher_precisions))
    return out


def _variants(model, role, tp, pp, dp, mb, m, even, n_gpus, memory_gib, pins, precision_bytes, gpus_per_node,
              teacher_precisions=("bf16",)):
    base = dict(tp=tp, pp=pp, dp=dp, micro_batch=mb)
    if not all(pin_allows(pins, role, k, v) for k, v in base.items()):
        return []
    split = None if even else split_layers(model.num_layers, pp)
    limit = memory_gib * _GIB
    if role == "teacher":
        axes = itertools.product(teacher_precisions, (0, 3) if dp > 1 else (0,), ("none", "weights"))
        layouts = (Layout(**base, zero=z, offload=off, sequence_parallel=tp > 1, num_gpus=n_gpus, forward_precision=fp)
                   for fp, z, off in axes if not (z == 3 and fp != "bf16")  # executor: FSDP shards no int8/fp8
                   and pin_allows(pins, role, "zero", z) and pin_allows(pins, role, "offload", off)
                   and pin_allows(pins, role, "precision", fp))
    else:
        vs = [1] + [v for v in (2,) if pp > 1 and even and model.num_layers % (pp * v) == 0 and m % pp == 0]
        # 8-bit gradients only pay where the dp group leaves the node (NVLink is not the
        # bottleneck); optimizer offload only where the model states crowd the GPU.
        gcs = ("none", "int8") if dp > 1 and dp * tp > gpus_per_node else ("none",)
        states = state_bytes_lower_bound(model, Layout(**base, num_gpus=n_gpus), role, precision_bytes)
        offs = ("none", "optimizer") if states > OFFLOAD_STATES_FRACTION * limit else ("none",)
        # A pin overrides the pruning rules (the pin still has to be valid).
        if "student.virtual_stages" in pins:
            v = pins["student.virtual_stages"]
            vs = [v] if v == 1 or (pp > 1 and even and model.num_layers % (pp * v) == 0 and m % pp == 0) else []
        if "student.grad_compression" in pins:
            gcs = (pins["student.grad_compression"],) if dp > 1 or pins["student.grad_compression"] == "none" else ()
        if "student.offload" in pins:
            offs = (pins["student.offload"],)
        axes = itertools.product(range(4) if dp > 1 else (0,), ("none", "selective", "full"),
                                 (False, True) if tp > 1 else (False,), vs, gcs, offs)
        layouts = (Layout(**base, zero=z, recompute=rc, sequence_parallel=sp, virtual_stages=v,
                          grad_compression=gc, offload=off, num_gpus=n_gpus,
                          schedule="interleaved_1f1b" if v > 1 else "1f1b")
                   for z, rc, sp, v, gc, off in axes
                   # the executor's 8-bit gradients are a DDP all-reduce hook: under ZeRO >= 1 the
                   # gradients are reduce-scattered, which it cannot compress (launch refuses it)
                   if not (gc == "int8" and z >= 1)
                   and all(pin_allows(pins, role, k, x) for k, x in (
                       ("zero", z), ("recompute", rc), ("sequence_parallel", sp), ("virtual_stages", v),
                       ("grad_compression", gc), ("offload", off))))
    return [Option(lo, split) for lo in layouts
            if state_bytes_lower_bound(model, lo, role, precision_bytes) <= limit]


def compressions(problem) -> list[Compression]:
    """Teacher-output formats the solver may choose: dense and top-k at ``TOPK_LEVELS`` with
    16/8/4-bit values, restricted by kd.allowed_compressions, --min-topk and a kd.compression pin."""
    kd = problem.job.kd
    if "kd.compression" in problem.pins:
        cands = [problem.pins["kd.compression"]]
    elif kd.allowed_compressions is not None:
        cands = list(kd.allowed_compressions)
    else:
        cands = [Compression("dense")] + [Compression("topk", k, b) for k in TOPK_LEVELS for b in VALUE_BITS]
    vocab = problem.student.vocab_size
    out = [c for c in cands if c.kind == "dense" or c.k < vocab]
    if kd.min_topk is not None:
        out = [c for c in out if c.kind == "dense" or c.k >= kd.min_topk]
    return out


def fidelity_k(c: Compression, vocab: int) -> int:
    """Teacher logits carried per token (dense carries all V)."""
    return vocab if c.kind == "dense" else c.k


def fidelity_key(c: Compression) -> tuple:
    """How faithful a teacher-output format is (higher is better): dense above any top-k, then
    more logits K, then more value bits. The planner never trades this away for < 1% of time."""
    return (1, 0, 0) if c.kind == "dense" else (0, c.k, c.bits)


def pareto(items: list, *keys) -> list:
    """The items no other item beats on every key (lower is better; exact ties keep the first).

    Called with (time, memory, bytes): memory only enters the ILP as an upper bound and bytes as
    the tie-break, so a layout another one beats on all three can never be chosen."""
    ranked = sorted(items, key=lambda it: tuple(k(it) for k in keys))
    if len(keys) == 2:  # sorted by the first key: a front point must improve the second
        front2, best = [], float("inf")
        for it in ranked:
            if keys[1](it) < best:
                front2.append(it)
                best = keys[1](it)
        return front2
    front: list = []
    for it in ranked:
        v = tuple(k(it) for k in keys)
        if not any(all(a <= b for a, b in zip(w, v)) for w in (tuple(k(f) for k in keys) for f in front)):
            front.append(it)
    return front


# ---- placement arrangements: which GPUs each role runs on ---------------------------------

MAX_SPLITS = 48  # disaggregated GPU splits tried on large clusters (geometric grid of node counts)


@dataclass(frozen=True)
class Arrangement:
    mode: str  # online | offline | train (no teacher)
    placement: str  # colocated | disaggregated
    teacher_gpus: int
    student_gpus: int
    teacher_group: int = 0
    student_groups: tuple[int, ...] = (0,)  # groups the student spans, in rank order

    @property
    def student_group(self) -> int:
        return self.student_groups[0]

    @property
    def gpus_used(self) -> int:
        if self.placement == "disaggregated":
            return self.teacher_gpus + self.student_gpus
        return self.student_gpus

    def label(self) -> str:
        if self.mode == "train":
            return "student only"
        if self.mode == "offline":
            return "offline (cached teacher outputs)"
        if self.placement == "colocated":
            return "colocated"
        return f"disaggregated {self.teacher_gpus}+{self.student_gpus}"


def group_gpus(cluster) -> list[int]:
    return [g.num_nodes * g.node.gpus_per_node for g in cluster.groups]


def splits(n: int, gpus_per_node: int) -> list[int]:
    """Teacher GPU counts for a disaggregated split of n GPUs (student gets the rest)."""
    if n <= gpus_per_node:
        return list(range(1, n))
    nodes = n // gpus_per_node
    counts = list(range(1, nodes))
    if len(counts) > MAX_SPLITS:
        ratio = nodes ** (1 / MAX_SPLITS)
        grid, x = set(), 1.0
        while x < nodes:
            grid.add(int(round(x)))
            x *= ratio
        counts = sorted(c for c in grid if 1 <= c < nodes)
    return [c * gpus_per_node for c in counts]


def arrangements(problem) -> list[Arrangement]:
    """Every arrangement the pins allow."""
    pins, cl = problem.pins, problem.cluster
    sizes = group_gpus(cl)
    n = sum(sizes)
    allg = tuple(range(len(sizes)))
    if problem.teacher is None:
        out = [Arrangement("train", "colocated", 0, n, 0, allg)]
        out += [Arrangement("train", "colocated", 0, s, g, (g,)) for g, s in enumerate(sizes) if len(sizes) > 1]
        return [a for a in out if arrangement_allowed(a, cl, pins)]  # student.gpu
    out = [Arrangement("online", "colocated", n, n, 0, allg)]
    if pins.get("kd.mode") == "offline":
        # Offline only when asked for: with one pass over the data the precomputing pass costs
        # the same teacher forward as online KD plus storage, so it cannot beat co-location on
        # time to distil, while its step time (teacher excluded) would flatter every ratio.
        out.append(Arrangement("offline", "colocated", n, n, 0, allg))
    if len(sizes) == 1:
        gpn = cl.groups[0].node.gpus_per_node
        out += [Arrangement("online", "disaggregated", t, n - t, 0, (0,)) for t in splits(n, gpn)]
    else:
        for g, s in enumerate(sizes):  # one group alone, or teacher on one group and student on another
            out.append(Arrangement("online", "colocated", s, s, g, (g,)))
            out += [Arrangement("online", "disaggregated", t, s2, g, (g2,))
                    for g2, s2 in enumerate(sizes) if g2 != g for t in teacher_gpu_counts(cl, g)]
    return [a for a in out if arrangement_allowed(a, cl, pins)]
