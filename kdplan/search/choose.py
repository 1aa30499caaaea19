"""The selection policy: which configuration of the priced space becomes the plan.

kdplan.search.candidates enumerates what could run, kdplan.search.space prices it into ILP blocks
and kdplan.search.ilp finds the optimum of one objective (step time, or dollars per million
tokens) over them. The plan is not simply that optimum: the objective does not see how faithful
the teacher's signal is, nor how many bytes cross the links, and within ``TIE_TOLERANCE`` (1%,
well inside the cost model's error) those decide. ``choose`` takes these steps, in this order:

1. The optimum. T*, the best objective over the whole space: every arrangement, every allowed
   teacher precision and the dominant teacher-output formats (kdplan.search.space.dominant: dense
   and the smallest, lossiest top-k). If nothing fits, Infeasible names the binding constraint
   and the nearest thing that fits (kdplan.search.diagnose).

2. Teacher precision (with --teacher-precision auto, when the GPUs allow fp8/int8). A quantized
   teacher changes the teacher's outputs, so like a lossy format it is taken only when it buys
   more than the tolerance: the space with the exact bf16 teacher is priced and solved too, and
   it is kept unless its optimum is more than TIE_TOLERANCE above T*. From here on the search
   is in the winner's space, and T* is that space's optimum.

3. Teacher-output format (the fidelity ladder). The most faithful format (``fidelity_key``:
   dense, then more logits K, then more value bits) whose own optimum is within TIE_TOLERANCE of
   T*; from here on the search is in that format's space alone. Within a kind (dense, top-k) a
   format changes only the teacher-output payload (bytes on the wire, the KD buffer), so its
   optimum can only grow with its bytes per token: among top-k formats "within tolerance" is a
   threshold on bytes per token, found by probing the largest first, then bisecting (at most ~5
   probes). Dense is already in the main space: its probe prices nothing. A probe prices only the
   arrangements whose step lower bound under the smallest format of the same kind
   (``Block.lower_bound``) is within the bound, and in them only the student layouts that were
   not already slower than the bound under that smaller format.

4. Bytes. In that space, among the configurations whose objective is within TIE_TOLERANCE of T*,
   the one that moves the fewest bytes per step (ilp ``min_bytes``): fewer bytes on the wire is
   more robust to slow links and noisy neighbours. The tolerance is spent once: when step 3 took
   a format whose own optimum is already above T*, only exact ties may trade time for bytes (else
   a plan could lose up to twice the tolerance; seen: the seed plan 0.6% slower than the mirror
   baseline it could have been).

5. Runner-ups. The next ``top_k`` configurations on the objective in that space, for the plan's
   alternatives: each solve cuts off the ones found before (ilp ``exclude``, ``next_best``).

Steps 2 and 3 say why in the plan: ``Solution.teacher_precision_reason``, ``compression_reason``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import Infeasible
from ..problem import Problem
from ..schema.compression import Compression
from . import candidates as cand
from .diagnose import diagnose
from .ilp import Block, Choice, KDProgram
from .space import PricedSpace, Space, teacher_least

TIE_TOLERANCE = 0.01  # configurations within 1% of the optimum are ties (the cost model's error is larger)


@dataclass
class Solution:
    """What the policy chose: the plan's configuration first, then the runner-ups."""

    choices: list[Choice]
    solver: str
    status: str
    solve_time_s: float  # steps 4 and 5
    gap: float | None
    num_variables: int
    optimum: float = 0.0  # T*: the objective's optimum in the space of step 2's winner
    compression_reason: str | None = None  # step 3: why this teacher-output format
    teacher_precision_reason: str | None = None  # step 2: why this teacher precision


def choose(problem: Problem, price: Callable[[Problem], PricedSpace], *,
           top_k: int = 0) -> tuple[Space, list[Block], Solution]:
    """Steps 1-5 (module docstring) for ``problem``: the chosen space, the blocks of the last
    program solved (``Solution.choices`` index them) and the solution. ``price(problem)``
    enumerates and prices a problem's space (kdplan.planner.Planner.price)."""
    kw = solve_settings(problem)
    # 1. the optimum over the whole space
    priced = price(problem)
    main, optimum = whole_space_optimum(priced)
    # 2. teacher precision: the exact teacher unless a quantized one gains more than the tolerance
    step2 = _teacher_precision(problem, price, priced, main, optimum)
    priced, main, optimum, precision_reason, quantized = (step2.space, step2.program, step2.optimum, step2.why,
                                                          step2.quantized)
    # 3. teacher-output format: the most faithful one within the tolerance, in its own space
    prog, format_reason = _teacher_output_format(priced, main, optimum)
    # 4. fewest bytes among the ties, 5. runner-ups
    sol = finish(prog, optimum, top_k=top_k, **kw)
    if main.time_limited:  # the reference optimum (or a format probe) is not proven either
        gaps = [main.limit_gap, sol.gap if sol.status == "time_limit" else 0.0]
        sol.status, sol.gap = "time_limit", None if None in gaps else max(gaps)
    if quantized:  # name the precision the chosen configuration's teacher runs at
        best = sol.choices[0]
        chosen = prog.blocks[best.block].teacher[best.teacher].option.layout.forward_precision \
            if best.teacher is not None else "bf16"
        precision_reason = f"auto: {chosen} weights; {precision_reason}"
    sol.compression_reason, sol.teacher_precision_reason = format_reason, precision_reason
    return priced.space, prog.blocks, sol


def solve_settings(problem: Problem) -> dict:
    """The job's [solver] settings as the ILP's solve arguments."""
    s = problem.job.solver
    return dict(solver=s.solver, time_limit_s=s.time_limit_s, gap=s.mip_gap)


def _program(problem: Problem, blocks: list[Block]) -> KDProgram:
    s = problem.job.solver
    return KDProgram(blocks, num_gpus=problem.num_gpus, gpus_used=[b.arrangement.gpus_used for b in blocks],
                     objective=s.objective, tokens_per_step=problem.job.global_batch * problem.job.seq_len,
                     min_topk=problem.job.kd.min_topk if problem.teacher is not None else None)


def _objective_scale(problem: Problem) -> Callable[[Block], float]:
    """Objective units per second of a block's step: 1 (time), or its GPUs' dollars per second per
    million tokens of a step (cost)."""
    tokens = problem.job.global_batch * problem.job.seq_len
    cost = problem.job.solver.objective == "cost"
    return lambda b: b.usd_per_s / tokens * 1e6 if cost else 1.0


# ---- 1. the optimum --------------------------------------------------------------------------

def whole_space_optimum(priced: PricedSpace) -> tuple[KDProgram, float]:
    """The program over every block of ``priced`` and its optimum T*; Infeasible, naming the
    binding constraint, when no configuration fits."""
    problem = priced.problem
    main = _program(problem, priced.blocks)
    optimum = main.optimum(**solve_settings(problem))
    if optimum == float("inf"):
        diagnose(problem, priced.space, priced.arrangements, priced.compressions, priced.pricer, colocated_sum=True)
        raise Infeasible("no configuration satisfies the memory, GPU and fidelity constraints", binding="ilp")
    return main, optimum


# ---- 2. teacher precision --------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionChoice:
    """Step 2's outcome (teacher precision): the space the selection goes on in, its program and optimum."""

    space: PricedSpace
    program: KDProgram
    optimum: float
    why: str | None
    """Why the teacher runs at the precision it does; with ``quantized`` only the reason's tail
    (the chosen precision is named once step 4 has chosen a layout)."""
    quantized: bool
    """Whether a quantized (fp8/int8) teacher may be chosen in ``space``."""


def _teacher_precision(problem: Problem, price: Callable[[Problem], PricedSpace], full: PricedSpace,
                       main: KDProgram, optimum: float) -> PrecisionChoice:
    """Step 2: the exact bf16 teacher unless a quantized one is worth more than the tie tolerance."""
    precs = problem.teacher_precisions if problem.teacher is not None else ("bf16",)
    if len(precs) == 1:
        return PrecisionChoice(full, main, optimum, _precision_reason(problem, precs[0]), quantized=False)
    exact_problem = replace(problem, teacher_precisions=("bf16",))
    exact_problem.cache = problem.cache  # same inputs: share the prices and the layout lists
    try:
        exact = price(exact_problem)
        exact_main, exact_optimum = whole_space_optimum(exact)
    except Infeasible:
        exact = None
    fo = optimum
    unit = "$/M tokens" if problem.job.solver.objective == "cost" else "s/step"
    low = "/".join(precs[1:])
    if exact is not None and exact_optimum <= fo * (1 + TIE_TOLERANCE) + 1e-12:
        gain = exact_optimum / fo - 1
        why = (f"auto: the exact teacher; a quantized one ({low}) would gain only {max(gain, 0.0):.1%} "
               f"(within the {TIE_TOLERANCE:.0%} tie tolerance)")
        return PrecisionChoice(exact, exact_main, exact_optimum, why, quantized=False)
    if exact is None:
        why = "the exact bf16 teacher does not fit"
    else:
        eo = exact_optimum
        why = (f"{eo / fo - 1:.1%} better than the best plan with the exact bf16 teacher "
               f"({fo:.4g} vs {eo:.4g} {unit}), beyond the {TIE_TOLERANCE:.0%} tie tolerance")
    return PrecisionChoice(full, main, optimum, why, quantized=True)


def _precision_reason(problem: Problem, prec: str) -> str | None:
    """Why the teacher runs at ``prec`` when the job allows only that one."""
    if problem.teacher is None:
        return None
    if "teacher.precision" in problem.pins:
        return "pinned by --fix teacher.precision"
    setting = problem.job.teacher_precision
    if setting == "auto":
        return "auto: no GPU of the cluster has fp8 or int8 tensor cores in its profile"
    if setting != "bf16":
        return f"asked for by --teacher-precision {setting} (quantized weights: a fidelity trade)"
    return "the exact teacher (default; --teacher-precision auto lets the solver quantize it where the GPUs support fp8/int8)"


# ---- 3. teacher-output format (the fidelity ladder) ------------------------------------------

def _teacher_output_format(priced: PricedSpace, main: KDProgram, optimum: float) -> tuple[KDProgram, str | None]:
    """(the program to solve last, restricted to the chosen format's blocks; why that format).

    ``main`` is the program over ``priced``, already solved to ``optimum``; a format outside it
    is priced on demand (``probe``)."""
    problem, space, arrs, comps = priced.problem, priced.space, priced.arrangements, priced.compressions
    solve_kw, objective_scale = solve_settings(problem), _objective_scale(problem)
    blocks = main.blocks
    if problem.teacher is None or not blocks or blocks[0].arrangement.mode == "train":
        main.restrict(lambda b: True)
        return main, None
    vocab, bound = problem.kd_vocab_size, optimum * (1 + TIE_TOLERANCE) + 1e-12
    # per (arrangement, kind): a lower bound of its optimum under any format of that kind
    floor: dict[tuple, float] = {}
    like: dict[tuple, Compression] = {}  # the format priced for (arrangement, kind) in the main space
    teacher_s: dict[tuple, float] = {}  # the least a teacher adds to the step there (s)
    for b in blocks:
        k = (b.arrangement, b.compression.kind)
        floor[k] = min(floor.get(k, float("inf")), b.lower_bound() * objective_scale(b))
        like[k] = b.compression
        teacher_s[k] = min(teacher_s.get(k, float("inf")), teacher_least(b))
    probes: dict[Compression, tuple[float, KDProgram | None]] = {}  # format -> (its optimum, the program of its blocks)
    last_on_main = [None]  # the format main was last solved for (its solution is still loaded)

    def probe(c: Compression) -> float:
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
                blks = space.blocks(keep, [c], cut, tie_tolerance=TIE_TOLERANCE) if keep else []
                space.num_combos += combos
                prog = _program(problem, blks) if blks else None
                probes[c] = (prog.optimum(**solve_kw) if prog else float("inf"), prog)
        return probes[c][0]

    order = sorted(comps, key=cand.fidelity_key, reverse=True)
    pick = None
    if order[0].kind == "dense" and probe(order[0]) <= bound:
        pick = order[0]
    else:
        # Monotone in bytes within a kind only (top-k and sampled targets cost the loss differently):
        # bisect each kind on its own, then take the most faithful of all kinds' passing formats.
        passing = []
        for kind in sorted({c.kind for c in order if c.kind != "dense"}):
            topk = [c for c in order if c.kind == kind]
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
                passing += [c for c in topk if c.bytes_per_token(vocab) <= levels[lo]]
        if passing:
            pick = max(passing, key=cand.fidelity_key)
    if pick is None:  # cannot happen: the main optimum's own format passes; keep every block
        main.restrict(lambda b: True)
        return main, None
    probe(pick)
    prog = probes[pick][1]
    if prog is main and last_on_main[0] != pick:
        main.restrict(lambda b: b.compression == pick)
    worse = [c for c, (t, _) in probes.items() if t > bound and cand.fidelity_key(c) > cand.fidelity_key(pick)]
    return prog, f"{pick}: " + _why(pick, worse, probes, optimum, comps, problem)


def _why(pick: Compression, worse: list[Compression], probes: dict[Compression, tuple[float, KDProgram | None]],
         optimum: float, comps: list[Compression], problem: Problem) -> str:
    """Why ``pick``: pinned, the most faithful within tolerance, or what the next more faithful
    format tried (``worse``) would have cost."""
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


# ---- 4. fewest bytes among the ties, 5. runner-ups -------------------------------------------

def finish(prog: KDProgram, optimum: float, *, top_k: int = 0, solver: str = "highs", time_limit_s: float = 60.0,
           gap: float = 0.0) -> Solution:
    """Steps 4 and 5 in ``prog`` (the chosen format's space; ``optimum`` is T*, which may be the
    optimum of a larger space): the configuration that moves the fewest bytes among the ties,
    then ``top_k`` runner-ups on the objective."""
    kw = dict(solver=solver, time_limit_s=time_limit_s, gap=gap)
    t0 = time.perf_counter()
    name, status, sol_gap, best = prog.best(**kw)
    # The tolerance is spent once: when this space's optimum is already above T* (a more
    # faithful format chosen within tolerance), only exact ties may trade time for bytes.
    spent = best.objective > optimum * (1 + 1e-9)
    tolerance = 0.0 if spent else TIE_TOLERANCE
    bound = max(best.objective, optimum) * (1 + tolerance) * (1 + 1e-9) + 1e-12
    best = prog.min_bytes(bound, **kw) or best
    choices = [best]
    prog.exclude(best)
    for _ in range(top_k):
        runner_up = prog.next_best(**kw)
        if runner_up is None:
            break
        choices.append(runner_up)
        prog.exclude(runner_up)
    if prog.time_limited:  # a solve of the objective stopped at its time limit: not proven
        status, sol_gap = "time_limit", prog.limit_gap
    return Solution(choices, name, status, time.perf_counter() - t0, sol_gap, prog.num_variables, optimum)
