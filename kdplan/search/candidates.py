"""Candidates (the search's first stage, enumerate): what the solver may choose from, before any
price. Placement arrangements (``arrangements``: mode, placement and the GPUs and cluster groups of
each role), every valid layout of one role on its GPUs that the pins allow (``role_options``) and
the teacher-output formats (``compressions``). kdplan.search.space prices them into ILP blocks.

Only valid layouts are emitted (the ILP never sees an invalid one):
- tp divides the query heads and the KV heads, and stays inside a node;
- pp divides the layer count (the student may also take an uneven split,
  ``kdplan.schema.layers.split_layers``: the first and last stages lighter, because they also
  carry the embedding and the LM head with the KD loss);
- dp * tp * pp * cp equals the role's GPUs and dp divides the global batch;
- cp (context parallelism, ring attention; ``context_parallel_degrees``): 1, and 2, 4, 8 only
  where sequences are long (``CP_MIN_SEQ_LEN``) or where no layout without it passes the memory
  floors; the ring inside a node (tp * cp GPUs) and 2*cp dividing the sequence (zigzag chunks);
- micro_batch divides the per-replica batch. The solver explores every such divisor up to
  ``max(MIN_EXPLORED_MICRO_BATCH, MAX_MICRO_BATCH_TOKENS / seq_len)`` (the student; the teacher up
  to ``MIN_EXPLORED_MICRO_BATCH``) whose activation floor
  (``activation_bytes_lower_bound``) plus the model states fits (beyond that many tokens per
  micro-batch the GEMMs are saturated and activations only grow);
- student: ZeRO 0-3 (0 only when dp = 1), recompute none|selective|full, sequence parallel only
  with tp > 1, 2 virtual stages only with pp > 1 and micro-batches divisible by pp, 8-bit
  gradient compression only when the dp group crosses nodes, optimizer offload only when the
  model states alone exceed ``OFFLOAD_STATES_FRACTION`` of HBM (pruning rules: elsewhere they
  cannot pay for their cost);
- teacher: forward only, so no gradients, optimizer or recomputation; ZeRO 0 or 3 (weight
  sharding over its dp group), weights in HBM or offloaded to host; an MoE teacher also its
  expert-parallel degree ep (``expert_parallel_degrees``: divisors of dp that divide the routed
  experts; with ZeRO 0 only); forward precision bf16
  (exact) or fp8/int8 (quantized weights) among ``teacher_precisions``: the job's
  --teacher-precision / teacher.precision pin, restricted to what the role's GPUs support
  (kdplan.teacher_precision).

``--fix`` pins (``problem.pins``) filter here through ``kdplan.pins.pin_allows``; a pin nothing
satisfies is named by ``kdplan.pins.check_layout_pins``. Pins are never pruned: the exploration
caps above (micro-batch tokens, tp inside a node, the student's uneven split depth) bound only what
the solver explores by itself; a pinned value that is valid for the model and batch is enumerated
and priced.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import InputError
from ..pins import arrangement_allowed, pin_allows
from ..profiles import load_fidelity_curve
from ..schema.capability import layout_unsupported
from ..schema.compression import VALUE_BITS, Compression, parse_compression, sampled_loss_error
from ..schema.layers import split_layers
from ..schema.model import ModelSpec
from ..schema.plan import Layout
from .mixed import teacher_gpu_counts

# The solver's own micro-batch exploration (pins bypass it): every divisor of the per-replica
# batch up to 16 sequences, or up to 64K tokens per micro-batch where that is more (a 125M-1B
# student at sequence 512-2048 runs micro-batches of 32-128: issue 13).
MIN_EXPLORED_MICRO_BATCH = 16
MAX_MICRO_BATCH_TOKENS = 65536
CP_DEGREES = (2, 4, 8)  # context-parallel degrees the solver explores by itself (pins bypass)
CP_MIN_SEQ_LEN = 32768
"""Sequences from which the solver also explores context parallelism: there the s^2 attention is
most of a block's work and its activations crowd one GPU (EasyContext trains 64K-700K tokens on
8 A100 with an 8-way ring); shorter ones are split over cp only when nothing fits without it."""
OFFLOAD_STATES_FRACTION = 0.25  # consider optimizer offload once the states exceed this share of HBM
TOPK_LEVELS = (8, 16, 32, 64, 128, 256, 1024)
SAMPLED_FORMATS = ("sample:64", "topk:8+sample:48")
"""Sampled teacher targets the search considers by default (benchmarks/compression_quality.py
measures them: ~150x fewer bytes than dense at V = 8,192)."""
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
        return (lo.tp, lo.pp, lo.dp, lo.cp, lo.ep, lo.zero, lo.micro_batch, lo.recompute, lo.sequence_parallel,
                lo.virtual_stages, lo.offload, lo.grad_compression, self.stage_layers, self.stage_groups,
                lo.forward_precision, lo.shard)


def state_bytes_lower_bound(model: ModelSpec, lo: Layout, role: str, precision_bytes: int = 2) -> float:
    """A memory floor per GPU (bytes) that needs no pricing: the model states alone.

    Student: 16 B/param of mixed-precision Adam (formulas.md section 2) sharded by ZeRO; teacher:
    weights only. Used to discard layouts before pricing; the cost model has the final word.
    """
    params = model.num_params() / (lo.tp * lo.pp)
    if role == "teacher":
        if lo.ep > 1 and model.moe is not None:  # each rank holds 1/ep of the routed experts
            routed = model.moe_layers * model.moe.num_experts * model.expert_params()
            params -= routed * (1 - 1 / lo.ep) / (lo.tp * lo.pp)
        if lo.offload == "weights":
            return 0.0
        per = precision_bytes if lo.forward_precision == "bf16" else 1  # quantized: >= 1 B/param
        return params * per / (lo.state_shards if lo.zero == 3 else 1)
    d = lo.state_shards
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


def activation_bytes_lower_bound(model: ModelSpec, role: str, *, tp: int, pp: int, micro_batch: int,
                                 seq_len: int, precision_bytes: int = 2) -> float:
    """A floor on what one micro-batch's activations take on the fullest GPU (bytes), whatever the
    variant: the last stage holds at least its blocks' inputs under full recompute with sequence
    parallelism (q*s*b*h/t each; a forward-only teacher one block's) plus its 16-bit logits,
    vocabulary-parallel (b*s*V/t*q). The cost model's own figure is always larger."""
    tokens = micro_batch * seq_len
    blocks = 1 if role == "teacher" else -(-model.num_layers // pp)
    per_token = blocks * model.hidden_size + model.vocab_size
    return tokens * per_token * precision_bytes / tp


def context_parallel_degrees(n_gpus: int, tp: int, *, seq_len: int | None, gpus_per_node: int,
                             pinned: int | None = None, fallback: bool = False) -> list[int]:
    """Context-parallel degrees to enumerate for ``n_gpus // tp`` GPUs per tensor-parallel rank:
    the pin alone when it divides them (valid for the sequence or not: the cost model says why
    not), else 1 and, where ``seq_len`` >= CP_MIN_SEQ_LEN or ``fallback`` (nothing fit without
    it), each of CP_DEGREES that divides them, keeps the ring inside a node and cuts the
    sequence into 2*cp equal chunks."""
    rest = n_gpus // tp
    if pinned is not None:
        return [pinned] if pinned >= 1 and rest % pinned == 0 else []
    if not seq_len or not (seq_len >= CP_MIN_SEQ_LEN or fallback):
        return [1]
    more = [c for c in CP_DEGREES if rest % c == 0 and tp * c <= gpus_per_node and seq_len % (2 * c) == 0]
    return ([] if fallback else [1]) + more


def expert_parallel_degrees(model: ModelSpec, dp: int) -> list[int]:
    """Expert-parallel degrees of a forward-only teacher with ``dp`` data-parallel ranks: every
    divisor of dp that also divides the routed experts (1 alone for a dense model)."""
    if model.moe is None:
        return [1]
    return [e for e in divisors(dp) if model.moe.num_experts % e == 0]


def micro_batches(per_replica: int, *, seq_len: int | None, pinned: int | None = None,
                  role: str = "student") -> list[int]:
    """Micro-batches to enumerate for a replica of ``per_replica`` sequences: the pin alone when
    it divides (else none), or every divisor within the exploration cap. The token cap applies to
    the student (small KD students run large micro-batches); a forward-only teacher explores up
    to ``MIN_EXPLORED_MICRO_BATCH`` sequences, where its GEMMs are already large (solve time)."""
    if pinned is not None:
        return [pinned] if pinned >= 1 and per_replica % pinned == 0 else []
    tokens_cap = MAX_MICRO_BATCH_TOKENS // seq_len if (seq_len and role == "student") else 0
    cap = max(MIN_EXPLORED_MICRO_BATCH, tokens_cap)
    return [mb for mb in divisors(per_replica) if mb <= cap]


def shard_groups(dp: int, tp: int, gpus_per_node: int, pinned: int | None = None) -> list[int | None]:
    """Shard groups (Layout.shard_group) to explore for a dp group: the whole group (None) and,
    where the group spans nodes, one node's dp ranks (HSDP: gathers on NVLink, the shards
    all-reduced across nodes). A pin is priced as given when it divides dp (else nothing)."""
    if pinned is not None:
        return [None if pinned == dp else pinned] if pinned >= 1 and dp % pinned == 0 else []
    per_node = gpus_per_node // tp if gpus_per_node % tp == 0 else 0
    if dp > 1 and dp * tp > gpus_per_node and 1 <= per_node < dp and dp % per_node == 0:
        return [None, per_node]
    return [None]


def role_options(model: ModelSpec, role: str, n_gpus: int, *, gpus_per_node: int, global_batch: int,
                 memory_gib: float, pins: dict, precision_bytes: int = 2, seq_len: int | None = None,
                 allow_cross_node_tp: bool = False, teacher_precisions: tuple[str, ...] = ("bf16",),
                 runnable: bool = False, student_precision: str = "job") -> list[Option]:
    """All valid layouts of ``role`` on ``n_gpus`` GPUs that satisfy the pins and whose model
    states (plus, with ``seq_len``, an activation floor) fit in ``memory_gib`` per GPU (a teacher
    at each of ``teacher_precisions``). Pinned values skip the exploration caps (module docstring).
    ``runnable`` (kdplan plan --runnable): only layouts the executor runs (kdplan.schema.capability).
    ``student_precision`` (the job's): a trained role's Layout.train_precision.
    Context parallelism (``context_parallel_degrees``) is explored for long sequences, and for
    shorter ones only when no layout without it passes the memory floors."""
    heads = (model.num_heads, model.num_kv_heads)
    L = model.num_layers
    pin_tp = f"{role}.tp" in pins
    pin_pp = f"{role}.pp" in pins
    pin_mb = pins.get(f"{role}.micro_batch")
    pin_cp = pins.get(f"{role}.cp")

    def enumerate_(fallback: bool) -> list[Option]:
        out: list[Option] = []
        for tp in divisors(n_gpus):
            if any(h % tp for h in heads) or (tp > gpus_per_node and not (allow_cross_node_tp or pin_tp)):
                continue
            for cp in context_parallel_degrees(n_gpus, tp, seq_len=seq_len, gpus_per_node=gpus_per_node,
                                               pinned=int(pin_cp) if pin_cp is not None else None, fallback=fallback):
                for pp in divisors(n_gpus // (tp * cp)):
                    if pp > L:
                        continue
                    even = L % pp == 0
                    # the cost model prices uneven splits for the student only; deeper than L/2 only pinned
                    if not even and (role == "teacher" or (pp > L // 2 and not pin_pp)):
                        continue
                    dp = n_gpus // (tp * pp * cp)
                    if global_batch % dp:
                        continue
                    per_replica = global_batch // dp
                    for mb in micro_batches(per_replica, seq_len=seq_len, role=role,
                                            pinned=int(pin_mb) if pin_mb is not None else None):
                        m = per_replica // mb
                        act = 0.0
                        if seq_len:
                            act = activation_bytes_lower_bound(model, role, tp=tp, pp=pp, micro_batch=mb,
                                                               seq_len=seq_len // cp, precision_bytes=precision_bytes)
                        found = _variants(model, role, tp, pp, dp, mb, m, even, n_gpus, memory_gib, pins,
                                          precision_bytes, gpus_per_node, teacher_precisions, act, cp=cp,
                                          train_precision=student_precision)
                        out.extend(o for o in found if not runnable or layout_unsupported(role, o.layout, model) is None)
        return out

    out = enumerate_(False)
    if not out and pin_cp is None and seq_len and seq_len < CP_MIN_SEQ_LEN:
        out = enumerate_(True)  # nothing fits whole: split the sequences over a ring
    return out


def _variants(model, role, tp, pp, dp, mb, m, even, n_gpus, memory_gib, pins, precision_bytes, gpus_per_node,
              teacher_precisions=("bf16",), act_floor: float = 0.0, cp: int = 1, train_precision: str = "job"):
    base = dict(tp=tp, pp=pp, dp=dp, micro_batch=mb) | ({"cp": cp} if cp > 1 else {})
    if not all(pin_allows(pins, role, k, v) for k, v in base.items()):
        return []
    split = None if even else split_layers(model.num_layers, pp)
    limit = memory_gib * _GIB
    if role == "teacher":
        axes = itertools.product(teacher_precisions, (0, 3) if dp * cp > 1 else (0,), ("none", "weights"),
                                 expert_parallel_degrees(model, dp) if cp == 1 else [1])
        layouts = (Layout(**base, zero=z, offload=off, sequence_parallel=tp > 1, num_gpus=n_gpus, forward_precision=fp,
                          ep=ep)
                   for fp, z, off, ep in axes if not (z == 3 and fp != "bf16")  # executor: FSDP shards no int8/fp8
                   and not (z == 3 and ep > 1)  # experts split over ep, the rest replicated (pins.EP_ZERO3_MSG)
                   and pin_allows(pins, role, "zero", z) and pin_allows(pins, role, "offload", off)
                   and pin_allows(pins, role, "precision", fp) and pin_allows(pins, role, "ep", ep))
    else:
        vs = [1] + [v for v in (2,) if pp > 1 and even and model.num_layers % (pp * v) == 0 and m % pp == 0]
        # 8-bit gradients only pay where the dp group leaves the node (NVLink is not the
        # bottleneck); optimizer offload only where the model states crowd the GPU.
        replicas = dp * cp  # ranks holding the same weights (context-parallel ranks do too)
        gcs = ("none", "int8") if replicas > 1 and replicas * tp > gpus_per_node else ("none",)
        states = state_bytes_lower_bound(model, Layout(**base, num_gpus=n_gpus), role, precision_bytes)
        offs = ("none", "optimizer") if states > OFFLOAD_STATES_FRACTION * limit else ("none",)
        # A pin overrides the pruning rules (the pin still has to be valid).
        if "student.virtual_stages" in pins:
            v = pins["student.virtual_stages"]
            vs = [v] if v == 1 or (pp > 1 and even and model.num_layers % (pp * v) == 0 and m % pp == 0) else []
        if "student.grad_compression" in pins:
            gcs = (pins["student.grad_compression"],) if replicas > 1 or pins["student.grad_compression"] == "none" else ()
        if "student.offload" in pins:
            offs = (pins["student.offload"],)
        shards = shard_groups(dp, tp * cp, gpus_per_node, pins.get("student.shard_group"))
        axes = itertools.product(range(4) if replicas > 1 else (0,), ("none", "selective", "full"),
                                 (False, True) if tp > 1 else (False,), vs, gcs, offs, shards)
        layouts = (Layout(**base, zero=z, recompute=rc, sequence_parallel=sp, virtual_stages=v,
                          grad_compression=gc, offload=off, num_gpus=n_gpus, shard_group=sg,
                          schedule="interleaved_1f1b" if v > 1 else "1f1b", train_precision=train_precision)
                   for z, rc, sp, v, gc, off, sg in axes
                   if sg is None or z >= 1
                   # the executor's 8-bit gradients are a DDP all-reduce hook: under ZeRO >= 1 the
                   # gradients are reduce-scattered, which it cannot compress (launch refuses it)
                   if not (gc == "int8" and z >= 1)
                   and all(pin_allows(pins, role, k, x) for k, x in (
                       ("zero", z), ("recompute", rc), ("sequence_parallel", sp), ("virtual_stages", v),
                       ("grad_compression", gc), ("offload", off))))
    return [Option(lo, split) for lo in layouts
            if state_bytes_lower_bound(model, lo, role, precision_bytes) + act_floor <= limit]


def compressions(problem) -> list[Compression]:
    """Teacher-output formats the solver may choose: dense, top-k at ``TOPK_LEVELS`` with
    16/8/4-bit values and the sampled ``SAMPLED_FORMATS`` (forward KL only), restricted by
    kd.allowed_compressions, --min-topk, --min-fidelity (the measured curve) and a kd.compression pin."""
    kd = problem.job.kd
    curve = load_fidelity_curve(kd.fidelity_curve) if kd.min_fidelity is not None else None
    if "kd.compression" in problem.pins:
        cands = [problem.pins["kd.compression"]]
    elif kd.allowed_compressions is not None:
        cands = list(kd.allowed_compressions)
    else:
        cands = [Compression("dense")] + [Compression("topk", k, b) for k in TOPK_LEVELS for b in VALUE_BITS]
        cands += [parse_compression(f) for f in SAMPLED_FORMATS]
        if curve is not None:  # every measured format is a candidate under --min-fidelity
            cands += [parse_compression(f) for f in curve.formats if parse_compression(f) not in cands]
    vocab = problem.kd_vocab_size
    out = [c for c in cands if c.kind == "dense" or c.k < vocab]
    if kd.min_topk is not None:
        out = [c for c in out if c.kind == "dense" or c.k >= kd.min_topk]
    if problem.teacher is not None and "kd.compression" in problem.pins:
        if why := sampled_loss_error(problem.pins["kd.compression"], kd.loss):
            raise InputError(why)
    out = [c for c in out if sampled_loss_error(c, kd.loss) is None]
    if curve is not None:
        out = [c for c in out if (curve.fidelity(c) or 0.0) >= kd.min_fidelity]
    return out


def fidelity_note(problem, c: Compression) -> str | None:
    """What --min-fidelity chose by (None without it): the format's measured share, its bytes, the
    curve's provenance, and which formats were eligible."""
    kd = problem.job.kd
    if kd.min_fidelity is None or problem.teacher is None:
        return None
    curve = load_fidelity_curve(kd.fidelity_curve)
    vocab = problem.kd_vocab_size
    pv = curve.provenance
    eligible = ", ".join(f"{x} {curve.fidelity(x):.0%}" for x in compressions(problem))
    below = ", ".join(f"{parse_compression(f)} {m.fidelity:.0%}" for f, m in curve.formats.items()
                      if m.fidelity < kd.min_fidelity)
    return (f"--min-fidelity {kd.min_fidelity:g}: {c} ({c.bytes_per_token(vocab):,.0f} B/token) keeps a measured "
            f"{curve.fidelity(c):.0%} of dense KD's gain (lower end of the 95% interval; {pv.teacher} -> {pv.student}, "
            f"{pv.seeds} seeds x {pv.steps} steps, {pv.date}); the cheapest of the eligible formats ({eligible})"
            + (f"; below the bar: {below}" if below else "")
            + "; formats without a measurement are not eligible")


def fidelity_k(c: Compression, vocab: int) -> int:
    """Teacher logits carried per token (dense carries all V)."""
    return vocab if c.kind == "dense" else c.k


def fidelity_key(c: Compression) -> tuple:
    """How faithful a teacher-output format is (higher is better): dense above any top-k, then
    more logits K (a sampled target: its M + N ids), then more value bits; at equal ids a sampled
    target above top-k (it is unbiased; benchmarks/compression_quality.py measures it keeping
    more of dense KD's gain). The planner never trades this away for < 1% of time."""
    if c.kind == "dense":
        return (1, 0, 0, 0)
    return (0, c.k + c.samples, c.bits, int(c.sampled))


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
