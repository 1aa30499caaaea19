"""The search space (the search's second stage, price): arrangements x compressions x priced,
pruned layouts, as ILP blocks.

An *arrangement* (kdplan.search.candidates.Arrangement) fixes mode, placement, the GPUs of each
role and the cluster group(s) they run on. For each arrangement and compression the student and teacher layouts are priced by the cost
model (cached), those that do not fit are dropped, and only the Pareto front of (time, memory)
per role is kept: a layout that is slower and no smaller than another can never be in an
optimum, because memory only enters the ILP as an upper bound.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..cost.job import offline_read_gb_per_s
from ..pins import layout_pins
from ..problem import Problem
from ..schema.compression import Compression
from ..schema.layers import split_layers
from ..schema.plan import Layout, Prediction
from ..teacher_precision import supported
from . import candidates as cand
from .candidates import Arrangement, group_gpus
from .ilp import Block, PairPrice, Priced, Signature
from .mixed import balance_layers, balance_layers_with_head, relative_layer_time, stage_groups

if TYPE_CHECKING:
    from ..cost.api import Candidate, RolePrice, TransferPrice


class Pricer(Protocol):
    """What the search asks of a cost model (the module kdplan.cost is the one in use)."""

    def price_student(self, problem: Problem, layout: Layout, *, compression: Compression, mode: str = ...,
                      placement: str = ..., group: int = ..., stage_layers: tuple[int, ...] | None = ...,
                      stage_groups: tuple[int, ...] | None = ...) -> RolePrice: ...

    def price_teacher(self, problem: Problem, layout: Layout, *, compression: Compression,
                      group: int = ...) -> RolePrice: ...

    def price_transfer(self, problem: Problem, candidate: Candidate) -> TransferPrice: ...

    def compose(self, problem: Problem,
                candidate: Candidate) -> tuple[float, RolePrice, RolePrice | None, TransferPrice]: ...

    def evaluate(self, problem: Problem, candidate: Candidate, *, with_baselines: bool = ...) -> Prediction: ...


class Space:
    """Builds ILP blocks for a problem; caches layouts and prices across calls."""

    def __init__(self, problem: Problem, pricer: Pricer):
        self.p = problem
        self.pricer = pricer
        self.precision_bytes = 4 if problem.job.precision == "fp32" else 2
        self.num_options = 0
        self.num_priced = 0
        # the problem's cache (kdplan.problem.ProblemCache.layouts): planner.Planner shares it
        # between problems that differ only in pins, so they share the layouts too
        self._options: dict = problem.memo().layouts

    # ---- layouts -------------------------------------------------------------------------
    def options(self, role: str, n_gpus: int, groups: tuple[int, ...], floor: bool = True) -> list[cand.Option]:
        """Valid layouts; ``floor`` drops those whose model states alone overflow HBM."""
        pins = tuple(sorted((k, str(v)) for k, v in layout_pins(self.p.pins, role).items()))  # .gpu filters arrangements only
        key = (role, n_gpus, groups, floor, pins, self.p.teacher_precisions, self.p.job.solver.runnable,
               self.p.job.student_precision)
        if key not in self._options:
            self._options[key] = self._build_options(role, n_gpus, groups, floor)
        return self._options[key]

    def _build_options(self, role, n_gpus, groups, floor):
        cl, p = self.p.cluster, self.p
        model = p.teacher if role == "teacher" else p.student
        gpn = min(cl.groups[g].node.gpus_per_node for g in groups)
        mem = min(cl.gpu_of_group(g).memory_gib for g in groups) if floor else float("inf")
        # a quantized teacher only where every GPU it runs on has the tensor cores for it
        tprec = tuple(f for f in p.teacher_precisions
                      if f == "bf16" or all(f in supported(cl.gpu_of_group(g)) for g in groups))
        opts = cand.role_options(model, role, n_gpus, gpus_per_node=gpn, global_batch=p.job.global_batch,
                                 memory_gib=mem, pins=p.pins, precision_bytes=self.precision_bytes,
                                 seq_len=p.job.seq_len,
                                 teacher_precisions=tprec, runnable=p.job.solver.runnable,
                                 student_precision=p.job.student_precision)
        if len(groups) == 1 or role == "teacher":
            return opts
        # A student spanning several groups: stages fill the groups in rank order; keep the
        # layouts whose stages tile the groups, each with the even and the speed-balanced split.
        sizes = [group_gpus(cl)[g] for g in groups]
        rel = relative_layer_time(cl, p.job.precision)
        out = []
        for o in opts:
            lo = o.layout
            if lo.virtual_stages > 1:
                continue
            sg = stage_groups(sizes, lo.stage_gpus)
            if sg is None or len(set(sg)) < len(groups):
                continue
            sg = tuple(groups[i] for i in sg)
            even = split_layers(model.num_layers, lo.pp)
            ts = [rel[g] for g in sg]
            bal = balance_layers(model.num_layers, ts)
            # and with the last stage's output projection (+ loss) counted: V / (a layer's width)
            # layers' worth of work at a large vocabulary; the cost model prices each split
            head = balance_layers_with_head(model.num_layers, ts, model, p.job.seq_len)
            for split in dict.fromkeys((even, bal, head)):
                out.append(cand.Option(lo, split, sg))
        return out

    # ---- prices --------------------------------------------------------------------------
    def price_student(self, opt: cand.Option, comp: Compression, arr: Arrangement):
        mode = "offline" if arr.mode == "offline" else "online"
        self.num_priced += 1
        return self.pricer.price_student(self.p, opt.layout, compression=comp, mode=mode,
                                         placement=arr.placement, group=arr.student_group,
                                         stage_layers=opt.stage_layers, stage_groups=opt.stage_groups)

    def teacher_group(self, arr: Arrangement) -> int:
        """Co-located, the cost model prices the teacher on the student's (first) group."""
        return arr.teacher_group if arr.placement == "disaggregated" else arr.student_group

    def teacher_apart(self, arr: Arrangement) -> bool:
        """Offline with the teacher pass planned apart (Problem.teacher_pass_apart): no teacher layout here."""
        return arr.mode == "offline" and self.p.teacher_pass_apart

    def teacher_options(self, arr: Arrangement, floor: bool = True) -> list[cand.Option]:
        groups = arr.student_groups if arr.placement == "colocated" else (arr.teacher_group,)
        return self.options("teacher", arr.teacher_gpus, groups, floor)

    def price_teacher(self, opt: cand.Option, comp: Compression, arr: Arrangement):
        self.num_priced += 1
        return self.pricer.price_teacher(self.p, opt.layout, compression=comp, group=self.teacher_group(arr))

    def priced(self, role: str, arr: Arrangement, comp: Compression, cut: tuple | None = None) -> list[Priced]:
        """The role's fitting layouts, Pareto-pruned on (time, memory, bytes) within each transfer
        signature (layouts of different signature pay different teacher-output transfers).

        ``cut = (like, seconds)``: skip the student layouts whose time under ``like`` (a smaller
        format of the same kind, already priced) already exceeds ``seconds``: the step is at
        least the student's time, and a larger payload never makes it faster."""
        # Memoised with the layout lists (shared by problems that differ only in GPU count, see
        # planner.Planner._share_prices): the key holds everything the result reads.
        pins = tuple(sorted((k, str(v)) for k, v in layout_pins(self.p.pins, role).items()))
        if role == "teacher":
            where = (arr.teacher_gpus, arr.student_groups if arr.placement == "colocated" else (arr.teacher_group,),
                     self.teacher_group(arr))
        else:
            where = (arr.student_gpus, arr.student_groups, arr.student_group, self.teacher_group(arr))
        # an offline student's time includes its exposed read (price_transfer), at the cluster's read rate
        read = offline_read_gb_per_s(self.p.cluster) if role == "student" and arr.mode == "offline" else None
        key = ("priced", role, arr.mode, arr.placement, where, comp, cut, pins,
               self.p.teacher_precisions, self.p.job.solver.runnable, read)
        hit = self._options.get(key)
        if hit is None:
            hit = self._options[key] = self._priced(role, arr, comp, cut)
        return hit

    def _priced(self, role: str, arr: Arrangement, comp: Compression, cut: tuple | None) -> list[Priced]:
        job = self.p.job
        if role == "teacher":
            opts = self.teacher_options(arr)
            prices = [(o, self.price_teacher(o, comp, arr)) for o in opts]
        else:
            opts = self.options("student", arr.student_gpus, arr.student_groups)
            if cut is not None:
                like, limit = cut
                fast = [o for o in opts if (lambda pr: pr.fits and pr.time_s <= limit)(self.price_student(o, like, arr))]
                self.num_priced -= len(opts)  # those were cache hits
                opts = fast
            prices = [(o, self.price_student(o, comp, arr)) for o in opts]
        self.num_options += len(opts)
        out: dict[tuple, list[Priced]] = {}
        for o, pr in prices:
            if not pr.fits:
                continue
            lo = o.layout
            mem, t = pr.memory_gib, pr.time_s
            if role == "teacher" and arr.placement == "disaggregated":
                t = pr.steady_time_s  # it streams without flushing: its fill is paid once (cost.api)
            if role == "student" and arr.mode == "offline" and self.p.teacher is not None:
                t += self.pricer.price_transfer(self.p, self.candidate(arr, comp, None, Priced(o, t, mem))).exposed_s
            sig = (lo.tp, lo.pp, lo.dp) if role == "teacher" else (lo.tp, lo.pp, lo.dp, job.global_batch // (lo.dp * lo.micro_batch))
            sig += (lo.cp,) if lo.cp > 1 else ()  # a ring's shards of each sequence travel differently
            if arr.mode != "online":
                sig = ()
            out.setdefault(sig, []).append(Priced(o, t, mem, pr, sig, sum(pr.bytes_per_step.values())))
        if arr.mode == "online" and arr.placement == "colocated":
            # Co-located pairs are priced stage by stage (see colocated_combos), so a layout
            # can only be dropped when another beats it on every stage: compare vectors.
            groups: dict[tuple, list[Priced]] = {}
            for g in out.values():
                for priced in g:
                    key = (priced.sig, len(priced.price.stages), priced.option.layout.virtual_stages)
                    groups.setdefault(key, []).append(priced)
            return [priced for g in groups.values() for priced in _vector_pareto(g, role)]
        return [priced for group in out.values()
                for priced in cand.pareto(group, lambda x: x.time_s, lambda x: x.memory_gib, lambda x: x.bytes)]

    def candidate(self, arr: Arrangement, comp: Compression, teacher: Priced | None, student: Priced):
        from ..cost.api import Candidate
        so = student.option
        return Candidate(student=so.layout, teacher=teacher.option.layout if teacher else None,
                         mode="offline" if arr.mode == "offline" else "online",
                         placement=arr.placement, compression=comp, student_group=arr.student_group,
                         teacher_group=self.teacher_group(arr), student_stage_layers=so.stage_layers,
                         student_stage_groups=so.stage_groups)

    def pair_transfers(self, arr: Arrangement, comp: Compression, teacher: list[Priced],
                       student: list[Priced]) -> dict[tuple, tuple[float, float]]:
        """(teacher signature, student signature) -> (link time t, t / micro-batches, bytes):
        what the ILP's pair terms cost."""
        rep_t = {priced.sig: priced for priced in teacher}
        rep_s = {priced.sig: priced for priced in student}
        out = {}
        for st, t_priced in rep_t.items():
            for ss, s_priced in rep_s.items():
                x = self.pricer.price_transfer(self.p, self.candidate(arr, comp, t_priced, s_priced))
                if arr.placement == "disaggregated":
                    out[st, ss] = (x.time_s, x.time_s / ss[3], x.bytes_per_step)
                else:
                    out[st, ss] = (x.exposed_s, 0.0, x.bytes_per_step)
        return out

    def blocks(self, arrs: list[Arrangement], comps: list[Compression], cut: dict | None = None, *,
               tie_tolerance: float) -> list[Block]:
        """ILP blocks; ``cut``: arrangement -> (like, seconds) for ``priced`` (one format only);
        ``tie_tolerance``: the policy's (kdplan.search.choose), co-located pairs within it of a
        block's best step are kept (``colocated_combos``)."""
        cl = self.p.cluster
        overhead = cl.overheads.step_overhead_s
        self.num_combos = 0
        out = []
        for arr in arrs:
            s_mem = min(cl.gpu_of_group(g).memory_gib for g in arr.student_groups)
            t_groups = arr.student_groups if arr.placement == "colocated" else (arr.teacher_group,)
            t_mem = min(cl.gpu_of_group(g).memory_gib for g in t_groups)
            usd = self._usd_per_s(arr)
            for comp in (dominant(comps, self.p.kd_vocab_size) if arr.mode != "train" else [Compression("dense")]):
                with_teacher = arr.mode != "train" and not self.teacher_apart(arr)
                self.num_combos += (len(self.teacher_options(arr)) if with_teacher else 1) * \
                    len(self.options("student", arr.student_gpus, arr.student_groups))
                # the teacher first: when it has no layout here (e.g. its layers do not tile the
                # GPUs), no block can form and the student's layouts need no pricing
                teacher = self.priced("teacher", arr, comp) if with_teacher else []
                if with_teacher and not teacher:
                    continue
                student = self.priced("student", arr, comp, cut.get(arr) if cut else None)
                if not student:
                    continue
                pairs = self.pair_transfers(arr, comp, teacher, student) if arr.mode == "online" else {}
                combos = self.colocated_combos(arr, teacher, student, pairs, s_mem, overhead, tie_tolerance) \
                    if arr.mode == "online" and arr.placement == "colocated" else None
                if combos is not None and not combos:
                    continue
                out.append(Block(arr, comp, overhead, teacher, student, pairs, s_mem, t_mem, usd,
                                 cand.fidelity_k(comp, self.p.kd_vocab_size), combos))
        return out

    def colocated_combos(self, arr: Arrangement, teacher: list[Priced], student: list[Priced],
                         pairs: dict[tuple[Signature, Signature], PairPrice], limit_gib: float, overhead: float,
                         tie_tolerance: float, keep: int = 8) -> dict:
        """Co-located (teacher, student) pairs that fit, with their exact step, memory and bytes.

        The cost model's co-location rule is not separable: the teacher's forwards widen every
        slot of the student's pipeline (stage by stage when both have the same depth) and memory
        adds stage by stage. So each pair is priced by the cost model and enters the ILP as
        data; only pairs on the (step, bytes) front within ``tie_tolerance`` of the block's best
        step or among the ``keep`` fastest can be chosen or shown as runner-ups.

        Branch and bound: pairs are visited in order of a step lower bound (student time +
        overhead + the teacher's least possible addition, ``_teacher_floor``); once the bound
        exceeds both (1 + tolerance) x the best step found and the ``keep``-th fastest, no later
        pair can be chosen, so pricing stops. Every pair that could be chosen is still priced.
        """
        from ..cost.compose import colocated_memory, colocated_teacher_s
        floor_t = [min((x.memory_gib for x in priced.price.stages), default=priced.memory_gib) for priced in teacher]
        floor_s = [min((x.memory_gib for x in priced.price.stages), default=priced.memory_gib) for priced in student]
        framework = [priced.price.memory_terms_gib.get("framework", 0.0) for priced in teacher]
        depth_t = [len(priced.price.stages) for priced in teacher]
        t_same = [_teacher_floor(priced.price, True) for priced in teacher]
        t_other = [_teacher_floor(priced.price, False) for priced in teacher]
        order = sorted((s_priced.time_s + overhead
                        + (t_same[i] if depth_t[i] == len(s_priced.price.stages) else t_other[i]), i, j)
                       for j, s_priced in enumerate(student) for i in range(len(teacher))
                       if floor_t[i] + floor_s[j] - framework[i] <= limit_gib)  # cheap memory floor
        out, fastest, best = [], [], float("inf")  # fastest: max-heap (negated) of the keep fastest steps
        for lb, i, j in order:
            if lb > max(best * (1 + tie_tolerance), -fastest[0] if len(fastest) == keep else float("inf")):
                break
            t_priced, s_priced = teacher[i], student[j]
            mem = colocated_memory(s_priced.price, t_priced.price)[0]
            if mem > limit_gib:
                continue
            link, _, by = pairs.get((t_priced.sig, s_priced.sig), (0.0, 0.0, 0.0))
            teacher_s = colocated_teacher_s(s_priced.price, t_priced.price, s_priced.option.layout.virtual_stages)
            step = s_priced.time_s + teacher_s + link + overhead
            out.append((i, j, step, mem, t_priced.bytes + s_priced.bytes + by))
            best = min(best, step)
            heapq.heappush(fastest, -step)
            if len(fastest) > keep:
                heapq.heappop(fastest)
        self.num_pairs_priced = getattr(self, "num_pairs_priced", 0) + len(out)
        front = cand.pareto(out, lambda c: c[2], lambda c: c[4])
        fastest_pairs = sorted(out, key=lambda c: c[2])[:keep]
        return {(c[0], c[1]): c[2:] for c in front + fastest_pairs}

    def _usd_per_s(self, arr: Arrangement) -> float:
        cl = self.p.cluster
        if arr.placement == "disaggregated":
            tg, sg = arr.teacher_group, arr.student_group
            return ((cl.gpu_of_group(tg).price_per_hour_usd or 0.0) * arr.teacher_gpus
                    + (cl.gpu_of_group(sg).price_per_hour_usd or 0.0) * arr.student_gpus) / 3600
        return sum((cl.gpu_of_group(g).price_per_hour_usd or 0.0) * group_gpus(cl)[g]
                   for g in arr.student_groups) / 3600


def teacher_least(b: Block) -> float:
    """What any teacher of block b adds to a step at least (s), the student's time aside: the
    co-located floor (space._teacher_floor), the offline pass, 0 when disaggregated (overlapped)."""
    if not b.teacher or b.disaggregated:
        return 0.0
    if b.colocated:
        return min(min(_teacher_floor(priced.price, True), _teacher_floor(priced.price, False)) for priced in b.teacher)
    return min(priced.time_s for priced in b.teacher)


def _teacher_floor(pr, same_depth: bool) -> float:
    """The least a co-located teacher can add to a student's step (cost.compose rule): on the
    same pipeline depth, its m forwards of the least loaded stage (the pipeline charges m times
    the widest slot, and the fill/drain term only grows); otherwise its steady time."""
    if same_depth and pr.stages:
        return pr.num_micro_batches * min(x.per_micro_batch_s for x in pr.stages)
    return pr.steady_time_s if pr.stages else pr.steady_time_s + pr.bubble_s


def _colocated_key(role: str, priced: Priced) -> tuple:
    """What a co-located pair's step and memory depend on, per stage (cost.compose): lower is
    better in every entry. Student: its time outside the pipeline formula and its own slots;
    teacher: its steady time and its work per stage over the step."""
    pr = priced.price
    mems = tuple(x.memory_gib for x in pr.stages)
    if role == "teacher":
        work = tuple(x.per_micro_batch_s * pr.num_micro_batches for x in pr.stages)
        return (pr.steady_time_s, pr.memory_gib, priced.bytes) + work + mems
    slots = [x.per_micro_batch_s for x in pr.stages]
    v = priced.option.layout.virtual_stages
    rest = pr.time_s - (pr.num_micro_batches * max(slots) + (sum(slots) - max(slots)) / v) if slots else pr.time_s
    return (rest, pr.memory_gib, priced.bytes, pr.time_s) + tuple(slots) + mems


def _vector_pareto(items: list[Priced], role: str) -> list[Priced]:
    keyed = sorted(((_colocated_key(role, priced), priced) for priced in items), key=lambda kq: kq[0])
    front: list = []
    for k, priced in keyed:
        if not any(all(a <= b for a, b in zip(fk, k)) for fk, _ in front):
            front.append((k, priced))
    return [priced for _, priced in front]


def dominant(comps: list[Compression], vocab: int) -> list[Compression]:
    """Drop compressions another allowed one beats on every price term.

    Within one kind (dense | topk) a compression changes only the teacher-output payload: the
    bytes that travel (bytes per token) and the KD buffer on the student's last stage (bytes per
    token, divided by tp for dense, which is vocabulary-parallel). So c
    is dominated by c' when c' is no larger on the wire and in the buffer for every tp <= 64.
    The fidelity floor has already removed everything below --min-topk. Only formats of the
    same kind are compared: a top-k format pays a selection pass that dense does not (and dense
    a loss over the whole vocabulary), so their role times may differ.
    """
    def terms(c):
        bpt = c.bytes_per_token(vocab)
        return [bpt] + [bpt / tp if c.kind == "dense" else bpt for tp in (1, 2, 4, 8, 16, 32, 64)]

    keep = []
    for c in comps:
        tc = terms(c)
        beaten = any(o != c and o.kind == c.kind and all(a <= b for a, b in zip(terms(o), tc)) and
                     (terms(o) != tc or comps.index(o) < comps.index(c)) for o in comps)
        if not beaten:
            keep.append(c)
    return keep


@dataclass
class PricedSpace:
    """A problem's space, enumerated and priced (kdplan.planner.Planner.price): what the policy
    (kdplan.search.choose) chooses from."""

    space: Space
    arrangements: list[Arrangement]
    compressions: list[Compression]
    blocks: list[Block]

    @property
    def problem(self) -> Problem:
        return self.space.p

    @property
    def pricer(self) -> Pricer:
        return self.space.pricer
