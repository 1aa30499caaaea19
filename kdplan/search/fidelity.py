"""Fidelity-aware choice of the teacher-output format: never degrade the teacher signal unless it
buys something.

The main ILP runs over the *dominant* formats (those no other allowed one of the same kind beats
on every price term): dense and the smallest, lossiest top-k. Its optimum T* is the best step
time (or cost) reachable at all. The planner then takes the most faithful format
(``fidelity_key``: dense, then larger K, then more value bits) whose own optimum is within
``TIE_TOLERANCE`` of T*, and solves that format's space alone with the tie bound at T* (fewest
bytes among the ties, then the runner-ups).

Within a kind, a format changes only the teacher-output payload (bytes on the wire, the KD
buffer), so a format's optimum can only grow with its bytes per token: among top-k formats
"within tolerance" is a threshold on bytes per token, found by probing the largest first, then
bisecting (at most ~5 probes). Dense is already in the main space: its probe prices nothing. A
probe prices only the arrangements whose step lower bound under the smallest format of the same
kind (``Block.lower_bound``) is within the bound, and in them only the student layouts that
were not already slower than the bound under that smaller format.
"""

from __future__ import annotations

from . import candidates as cand
from .ilp import TIE_TOLERANCE
from .space import _teacher_floor


def choose_format(problem, space, arrs, comps, main, optimum, make_program, solve_kw, objective_scale):
    """(the program to solve last, restricted to the chosen format's blocks; why that format).

    ``main`` is the program over the main space, already solved to ``optimum``;
    ``objective_scale(block)`` converts a block's step time into objective units."""
    blocks = main.blocks
    if problem.teacher is None or not blocks or blocks[0].arrangement.mode == "train":
        main.restrict(lambda b: True)
        return main, None
    vocab, bound = problem.student.vocab_size, optimum * (1 + TIE_TOLERANCE) + 1e-12
    # per (arrangement, kind): a lower bound of its optimum under any format of that kind
    floor: dict[tuple, float] = {}
    like: dict[tuple, object] = {}  # the format priced for (arrangement, kind) in the main space
    teacher_s: dict[tuple, float] = {}  # the least a teacher adds to the step there (s)
    for b in blocks:
        k = (b.arrangement, b.compression.kind)
        floor[k] = min(floor.get(k, float("inf")), b.lower_bound() * objective_scale(b))
        like[k] = b.compression
        teacher_s[k] = min(teacher_s.get(k, float("inf")), _teacher_least(b))
    probes: dict = {}  # format -> (its optimum, the program that has its blocks)
    last_on_main = [None]  # the format main was last solved for (its solution is still loaded)

    def probe(c) -> float:
        if c not in probes:
            if any(b.compression == c for b in blocks):  # in the main space: no pricing, no rebuild
                main.restrict(lambda b: b.compression == c)
                probes[c] = (main.optimum(**solve_kw), main)
                last_on_main[0] = c
            else:
                keep = [a for a in arrs if floor.get((a, c.kind), float("inf")) <= bound]
                # a student slower than the bound under the smaller format can be skipped unpriced
                scale = {b.arrangement: objective_scale(b) for b in blocks}
                cut = {a: (like[a, c.kind], bound / scale[a] - blocks[0].overhead_s - teacher_s[a, c.kind]) for a in keep}
                combos = space.num_combos
                blks = space.blocks(keep, [c], cut) if keep else []
                space.num_combos += combos
                prog = make_program(blks) if blks else None
                probes[c] = (prog.optimum(**solve_kw) if prog else float("inf"), prog)
        return probes[c][0]

    order = sorted(comps, key=cand.fidelity_key, reverse=True)
    pick = None
    if order[0].kind == "dense" and probe(order[0]) <= bound:
        pick = order[0]
    else:
        topk = [c for c in order if c.kind != "dense"]
        levels = sorted({c.bytes_per_token(vocab) for c in topk})
        top_at = {lv: max((c for c in topk if c.bytes_per_token(vocab) == lv), key=cand.fidelity_key) for lv in levels}
        lo, hi = -1, len(levels)  # levels[:lo + 1] pass, levels[hi:] fail
        if levels and probe(top_at[levels[-1]]) <= bound:
            lo = hi - 1  # the largest passes (usual when co-located): no bisection
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(top_at[levels[mid]]) <= bound:
                lo = mid
            else:
                hi = mid
        if lo >= 0:
            pick = max((c for c in topk if c.bytes_per_token(vocab) <= levels[lo]), key=cand.fidelity_key)
    if pick is None:  # cannot happen: the main optimum's own format passes; keep every block
        main.restrict(lambda b: True)
        return main, None
    probe(pick)
    prog = probes[pick][1]
    if prog is main and last_on_main[0] != pick:
        main.restrict(lambda b: b.compression == pick)
    worse = [c for c, (t, _) in probes.items() if t > bound and cand.fidelity_key(c) > cand.fidelity_key(pick)]
    return prog, f"{pick}: " + _why(pick, worse, probes, optimum, comps, problem)


def _teacher_least(b) -> float:
    """What any teacher of block b adds to a step at least (s), the student's time aside: the
    co-located floor (space._teacher_floor), the offline pass, 0 when disaggregated (overlapped)."""
    if not b.teacher or b.disaggregated:
        return 0.0
    if b.colocated:
        return min(min(_teacher_floor(q.price, True), _teacher_floor(q.price, False)) for q in b.teacher)
    return min(q.time_s for q in b.teacher)


def _why(pick, worse, probes, optimum, comps, problem) -> str:
    if "kd.compression" in problem.pins:
        return "pinned by --fix kd.compression"
    if not worse:
        gain = probes[pick][0] / optimum - 1
        most = "the most faithful format allowed" if pick == max(comps, key=cand.fidelity_key) else \
            "the most faithful format within tolerance"
        return f"{most}; a smaller one would gain {max(gain, 0.0):.1%} (within the {TIE_TOLERANCE:.0%} tie tolerance)"
    c = max(worse, key=cand.fidelity_key)  # the next more faithful format that was tried
    t = probes[c][0]
    if t == float("inf"):
        return f"{c} does not fit in memory"
    cost = problem.job.solver.objective == "cost"
    unit, adj = ("$/M tokens", "costlier") if cost else ("s/step", "slower")
    return f"{c} would be {t / optimum - 1:.1%} {adj} ({t:.4g} vs {optimum:.4g} {unit}), beyond the {TIE_TOLERANCE:.0%} tie tolerance"
