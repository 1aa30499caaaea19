"""Brute force: price every candidate combination with the cost model and keep the fastest.

The proof of the ILP on problems small enough to enumerate: every arrangement x every allowed
compression (no dominance pruning) x every valid teacher layout x every valid student layout,
each composed by ``kdplan.cost.compose`` (the cost model's own rule, not the ILP's data) and
checked for memory with the cost model's co-location rule.
"""

from __future__ import annotations

from ..cost.compose import colocated_memory
from . import candidates as cand
from .ilp import Priced
from .space import Space, arrangements


def brute_force(problem, pricer=None):
    """(best objective in seconds, its Candidate, combinations tried); (inf, None, n) if none fits.

    The objective is the ILP's: step time, plus the one-off teacher pass for offline KD."""
    if pricer is None:
        from .. import cost as pricer
    space = Space(problem, pricer)
    best, best_c, tried = float("inf"), None, 0
    cl = problem.cluster
    for arr in arrangements(problem):
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
                    if step < best:
                        best, best_c = step, c
    return best, best_c, tried
