"""Infeasible is an answer: name the binding constraint and the smallest change that fits.

Called when no block survives pricing (some role fits nowhere) or when the ILP has no solution
(co-located roles fit alone but not together). It finds the role that binds, quotes the cost
model's reason for its smallest layout, and re-solves the feasibility question on larger copies
of the cluster to find the smallest GPU count that fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Infeasible, InputError
from ..problem import Problem
from ..profiles import scale_cluster
from ..schema.compression import Compression
from .ilp import Block

if TYPE_CHECKING:
    from .space import Pricer

MAX_GPUS = 65536


def _smallest(space, role, arr, comp):
    """The role's smallest-memory layout on ``arr`` (fitting or not) and its price."""
    if role == "teacher":
        opts = space.teacher_options(arr, floor=False)
        prices = [(o, space.price_teacher(o, comp, arr)) for o in opts]
    else:
        opts = space.options("student", arr.student_gpus, arr.student_groups, floor=False)
        prices = [(o, space.price_student(o, comp, arr)) for o in opts]
    if not prices:
        return None, None
    return min(prices, key=lambda op: op[1].memory_gib)


def feasible(problem: Problem, pricer: Pricer, comps: list[Compression]) -> tuple[bool, Block | None]:
    """Whether some arrangement fits on ``problem``'s cluster; returns (ok, a fitting block)."""
    from .candidates import arrangements
    from .space import Space
    space = Space(problem, pricer)
    # feasibility only: which co-located pairs are kept as near-ties does not change whether one fits
    for b in space.blocks(arrangements(problem), comps, tie_tolerance=0.0):
        if not b.colocated or min(t.memory_gib for t in b.teacher) + min(s.memory_gib for s in b.student) <= b.memory_limit_gib:
            return True, b
    return False, None


def smallest_fit(problem: Problem, pricer: Pricer, comps: list[Compression]) -> tuple[int | None, Block | None]:
    """The smallest GPU count (doubling, then bisecting over valid sizes) at which the problem fits."""
    n0 = problem.num_gpus

    def at(n):
        try:
            cl = scale_cluster(problem.cluster, n)
        except InputError:
            return False, None
        return feasible(Problem(job=problem.job, teacher=problem.teacher, student=problem.student,
                                cluster=cl, pins=problem.pins), pricer, comps)

    lo, hi, found = n0, n0 * 2, None
    while hi <= MAX_GPUS:
        ok, blk = at(hi)
        if ok:
            found = (hi, blk)
            break
        lo, hi = hi, hi * 2
    if found is None:
        return None, None
    unit = problem.cluster.groups[0].node.gpus_per_node if hi > problem.cluster.groups[0].node.gpus_per_node else 1
    if len(problem.cluster.groups) > 1:
        unit = problem.cluster.num_gpus
    for n in range(lo + unit - lo % unit if lo % unit else lo + unit, hi, unit):  # first fitting size
        ok, blk = at(n)
        if ok:
            return n, blk
    return found


def diagnose(problem, space, arrs, comps, pricer, colocated_sum: bool = False) -> None:
    """Raise Infeasible with the binding constraint and the nearest thing that fits."""
    comp = min(comps, key=lambda c: c.bytes_per_token(problem.student.vocab_size)) if comps else None
    gpu = problem.cluster.gpu_of_group(0)
    roles = ["student"] if problem.teacher is None else ["teacher", "student"]
    why = {}
    for role in roles:
        best = None
        for a in arrs:
            if role == "teacher" and a.mode == "train":
                continue
            _, pr = _smallest(space, role, a, comp)
            if pr is not None and (best is None or pr.memory_gib < best[1].memory_gib):
                best = (None, pr, a)
        why[role] = best
    binding = next((r for r in roles if why[r] is None or not why[r][1].fits), None)
    pins = ", ".join(f"{k}={v}" for k, v in problem.pins.items())
    pinned = f" with --fix {pins}" if pins else ""
    n, blk = smallest_fit(problem, pricer, comps)
    if binding is None:
        what = "teacher and student together"
        reason = "each fits alone but not both on the same GPUs, and no disaggregated split fits"
    else:
        model = problem.teacher if binding == "teacher" else problem.student
        what = f"{model.name} as {binding}"
        pr = why[binding][1] if why[binding] else None
        reason = (pr.why or f"its smallest layout needs {pr.memory_gib:.1f} GiB per GPU") if pr else "no valid layout"
    hint = ""
    if any(k.endswith(("recompute", "offload", "micro_batch", "zero")) for k in problem.pins):
        hint = "; or unpin " + ", ".join(k for k in problem.pins if k.endswith(("recompute", "offload", "micro_batch", "zero")))
    gpu_pins = [k for k in problem.pins if k.endswith(".gpu")]
    if n is None and gpu_pins:  # growing the cluster is not the answer when a role is held to one group
        relax = gpu_pins + [k for k in problem.pins if k.endswith(("recompute", "offload", "micro_batch", "zero"))]
        raise Infeasible(f"{what} does not fit{pinned}: {reason}; no layout fits on the GPUs the "
                         f"{'pin allows' if len(gpu_pins) == 1 else 'pins allow'}; unpin {', '.join(relax)}",
                         binding=binding or "memory", suggestion="relax the GPU pin")
    if n is None:
        raise Infeasible(f"{what} does not fit{pinned}: {reason}; no cluster of up to {MAX_GPUS} {gpu.name} fits it{hint}",
                         binding=binding or "memory", suggestion="relax the pins")
    lay = ""
    if blk is not None:
        src = blk.teacher if binding == "teacher" else blk.student
        if src:
            lo = min(src, key=lambda priced: priced.memory_gib).option.layout
            lay = f" with tp={lo.tp} and pp={lo.pp}"
    raise Infeasible(f"{what} does not fit on {problem.num_gpus} {gpu.name}{pinned}: {reason}; it needs at least "
                     f"{n} {gpu.name}{lay}; you gave {problem.num_gpus}{hint}",
                     binding=binding or "memory", suggestion=f"use --gpus {n}")
