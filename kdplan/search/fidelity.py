"""Fidelity-aware choice of the teacher-output format: never degrade the teacher signal unless it
buys something.

The main ILP runs over the *dominant* formats (those no other allowed one of the same kind
beats on every price term): dense and the smallest, lossiest top-k. Its optimum T* is the best step time (or cost)
reachable at all. Here the planner then takes the most faithful format (``fidelity_key``: dense,
then larger K, then more value bits) whose own optimum is within ``TIE_TOLERANCE`` of T*, and
solves that format's space again with the tie bound set at T* (fewest bytes among the ties).

Within a kind, a format changes only the teacher-output payload (bytes on the wire, the KD
buffer), so a format's optimum can only grow with its bytes per token: among top-k formats
"within tolerance" is a threshold on bytes per token, found by bisection (at most ~5 probes);
dense (buffer divided by tp) is probed on its own, then the largest top-k. When co-located,
the first or second probe usually passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Infeasible
from . import candidates as cand
from .ilp import TIE_TOLERANCE, KDProgram


@dataclass
class Probe:
    compression: object
    optimum: float  # inf when nothing fits
    blocks: list


def prefer_fidelity(problem, space, arrs, comps, blocks, sol, make_program, solve_kw, top_k):
    """(blocks, solution, reason) after moving to the most faithful format within tolerance."""
    best = blocks[sol.choices[0].block]
    if problem.teacher is None or best.arrangement.mode == "train":
        return blocks, sol, None
    chosen, vocab, optimum = best.compression, problem.student.vocab_size, sol.optimum
    bound = optimum * (1 + TIE_TOLERANCE) + 1e-12
    better = sorted((c for c in comps if cand.fidelity_key(c) > cand.fidelity_key(chosen)),
                    key=cand.fidelity_key, reverse=True)
    if not better:
        why = "pinned by --fix kd.compression" if "kd.compression" in problem.fixes else "the most faithful format allowed"
        return blocks, sol, f"{chosen}: {why}"
    combos = space.num_combos
    probes: dict[str, Probe] = {}

    def probe(c) -> Probe:
        if str(c) not in probes:
            blks = space.blocks(arrs, [c])
            opt = make_program(blks).optimum(**solve_kw) if blks else float("inf")
            probes[str(c)] = Probe(c, opt, blks)
        return probes[str(c)]

    pick = None
    dense = [c for c in better if c.kind == "dense"]
    if dense and probe(dense[0]).optimum <= bound:
        pick = dense[0]
    else:
        topk = [c for c in better if c.kind != "dense"]
        levels = sorted({c.bytes_per_token(vocab) for c in topk})
        top_at = {lv: max((c for c in topk if c.bytes_per_token(vocab) == lv), key=cand.fidelity_key) for lv in levels}
        lo, hi = -1, len(levels)  # levels[:lo + 1] pass, levels[hi:] fail
        if levels and probe(top_at[levels[-1]]).optimum <= bound:
            lo = hi - 1  # the largest passes (usual when co-located): one probe, no bisection
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(top_at[levels[mid]]).optimum <= bound:
                lo = mid
            else:
                hi = mid
        if lo >= 0:
            pick = max((c for c in topk if c.bytes_per_token(vocab) <= levels[lo]), key=cand.fidelity_key)
    space.num_combos = combos
    failed = [p for p in probes.values() if p.optimum > bound]
    if pick is None:
        return blocks, sol, f"{chosen}: " + _cost_of_more(failed, optimum, problem)
    blks = probe(pick).blocks
    try:
        new = make_program(blks).solve(**solve_kw, runner_ups=top_k, reference=optimum)
    except Infeasible:  # cannot happen when the probe found an optimum; keep the first answer
        return blocks, sol, None
    new.optimum = optimum
    space.num_combos = combos + sum(len(p.blocks) for p in probes.values())
    rest = [p for p in failed if cand.fidelity_key(p.compression) > cand.fidelity_key(pick)]
    if not rest:
        gain = (probes[str(pick)].optimum - optimum) / max(optimum, 1e-30)
        return blks, new, (f"{pick}: the most faithful format allowed; a smaller one would gain "
                           f"{max(gain, 0.0):.1%} (within the {TIE_TOLERANCE:.0%} tie tolerance)")
    return blks, new, f"{pick}: " + _cost_of_more(rest, optimum, problem)


def _cost_of_more(failed: list[Probe], optimum: float, problem) -> str:
    """Why the next more faithful format was not taken (the most faithful one that failed)."""
    if not failed:
        return "the most faithful format within tolerance"
    p = max(failed, key=lambda q: cand.fidelity_key(q.compression))
    cost = problem.job.solver.objective == "cost"
    unit, worse = ("$/M tokens", "costlier") if cost else ("s/step", "slower")
    if p.optimum == float("inf"):
        return f"{p.compression} does not fit in memory"
    return (f"{p.compression} would be {p.optimum / optimum - 1:.1%} {worse} "
            f"({p.optimum:.4g} vs {optimum:.4g} {unit}), beyond the {TIE_TOLERANCE:.0%} tie tolerance")
