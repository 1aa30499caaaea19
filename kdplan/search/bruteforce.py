"""Brute force: price every candidate combination with the cost model and keep the fastest.

The proof of the ILP on problems small enough to enumerate: every arrangement x every allowed
compression (no dominance pruning) x every valid teacher layout x every valid student layout,
each composed by ``kdplan.cost.compose`` (the cost model's own rule, not the ILP's data) and
checked for memory with the cost model's co-location rule. ``most_faithful`` applies the
planner's order to the result: the most faithful format whose best is within the tie tolerance.
"""

from __future__ import annotations

from ..cost.compose import colocated_memory
from . import candidates as cand
from .choose import TIE_TOLERANCE
from .ilp import Priced
from .space import Space


def brute_force(problem, pricer=None):
    """(best objective in seconds, its Candidate, combinations tried); (inf, None, n) if none fits.

    The objective is the ILP's: step time, plus the one-off teacher pass for offline KD."""
    return _enumerate(problem, pricer)[:3]


def most_faithful(problem, pricer=None):
    """(best objective, the most faithful compression within TIE_TOLERANCE of it or None)."""
    best, _, _, per_format = _enumerate(problem, pricer)
    ok = [c for c, t in per_format.items() if t <= best * (1 + TIE_TOLERANCE) + 1e-12]
    return best, max(ok, key=cand.fidelity_key) if ok else None


def _enumerate(problem, pricer):
    if pricer is None:
        from .. import cost as pricer
    space = Space(problem, pricer)
    best, best_c, tried = float("inf"), None, 0
    per_format: dict = {}  # compression -> best objective with it
    cl = problem.cluster
    for arr in cand.arrangements(problem):
        students = space.options("student", arr.student_gpus, arr.student_groups)
        teachers = space.teacher_options(arr) if arr.mode != "train" else [None]
        comps = cand.compressions(problem) if arr.mode != "train" else [cand.Compression("dense")]
        s_limit = min(cl.gpu_of_group(g).memory_gib for g in arr.student_groups)
        for comp in comps:
            for t in teachers:
                for s in students:
                    tried += 1
                    c = space.candidate(arr, comp, Priced(t, 0, 0) if t else None, Priced(s, 0, 0))
                    step, sp, tp, _ = pricer.compose(problem, c)
                    if not sp.fits:
                        continue
                    if arr.mode == "offline":
                        tp = space.price_teacher(t, comp, arr)
                        step += tp.time_s
                    if tp is not None:
                        if not tp.fits:
                            continue
                        if arr.placement == "colocated" and arr.mode == "online":
                            if colocated_memory(sp, tp)[0] > s_limit:
                                continue
                    if step < per_format.get(comp, float("inf")):
                        per_format[comp] = step
                    if step < best:
                        best, best_c = step, c
    return best, best_c, tried, per_format
