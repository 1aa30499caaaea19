"""The integer linear program over the priced space: its formulation and its solves.

What the planner takes from it (the optimum, then the fidelity and teacher-precision ladders, the
bytes tie-break and the runner-ups, in that order) is kdplan.search.choose; this module is the math.

Index sets
  b in B        blocks: one (placement arrangement a, teacher-output compression c) pair; an
                arrangement fixes mode (online|offline), placement (colocated|disaggregated),
                the GPU split g_t + g_s and the cluster group(s) each role runs on;
  i in T_b      teacher layouts that fit on the teacher's GPUs (empty: offline or no teacher);
  j in S_b      student layouts (with their pipeline split) that fit on the student's GPUs.

Variables
  u_b  in {0,1}  block b is chosen;
  x_bi in {0,1}  teacher layout i in block b;
  z_bj in {0,1}  student layout j in block b;
  c_bk in {0,1}  co-located pair k = (teacher layout, student layout) of block b;
  w_bp in [0,1]  pair p = (teacher signature, student signature) of block b is chosen
                 (a signature is what the teacher-output transfer depends on: tp, pp, dp and,
                 for the student, its micro-batches per step);
  tau_b >= 0     step time of block b (0 unless chosen), seconds.

Data (all from the cost model, kdplan.cost): t^T_bi, m^T_bi teacher time (s) and memory (GiB per
GPU) of layout i; t^S_bj, m^S_bj the same for the student under compression c_b; l_bp the
teacher-output link time of pair p and n_bp = l_bp / (student micro-batches) its pipeline-fill
share; o the fixed step overhead; M_b the per-GPU memory limit (GiB); G_b GPUs used; r_b
dollars per second of those GPUs; k_b teacher logits carried per token.

Objective (``_objective``)
  time:  min  sum_b tau_b
  cost:  min  sum_b (r_b / tokens_per_step) * tau_b * 1e6      (dollars per million tokens)

Constraints
  one configuration  (``_add_choice``)   choose_one:        sum_b u_b = 1
                                         teacher_layout_b:  sum_i x_bi = u_b  (blocks with a teacher)
                                         student_layout_b:  sum_j z_bj = u_b
  GPU budget         (``_add_budget``)   gpu_budget:        sum_b G_b u_b <= N
  per-GPU memory     (``_add_memory``)   memory_teacher_b / memory_student_b: sum m x <= M u_b for
                                         each role on its own GPUs (disaggregated, offline)
  co-located pairs   (``_add_pairs``)    The cost model's co-location rule is not separable (the
                                         teacher's forwards widen every slot of the student's
                                         pipeline, stage by stage, and memory adds stage by stage),
                                         so each fitting pair k = (i, j) is priced exactly
                                         (step s_bk, bytes y_bk) and chosen by a binary c_bk:
                                           combo_teacher_b_i: x_bi = sum_{k: i} c_bk
                                           combo_student_b_j: z_bj = sum_{k: j} c_bk
                                         (only pairs whose memory fits are created: that is the
                                         co-located memory constraint)
  transfer pairs     (``_add_pairs``)    disaggregated, signatures s of teacher and student:
                                         pair_teacher_b_s:  sum_{s'} w_b(s,s') = sum_{i: sig i = s} x_bi
                                         pair_student_b_s:  sum_{s'} w_b(s',s) = sum_{j: sig j = s} z_bj
                                         (a transportation polytope between two 0/1 marginals: w
                                         is exactly the product of the two signature choices)
  step time          (``_add_step``)     co-located: step_b: tau_b >= sum_k s_bk c_bk
                     max() linearised    disaggregated (pipelined over micro-batches, teacher at
                                         its steady rate):
                                           step_teacher_b:  tau_b >= sum t^T x + sum_p n_bp w_bp + o u_b
                                           step_student_b:  tau_b >= sum t^S z + sum_p n_bp w_bp + o u_b
                                           step_link_b:     tau_b >= sum_p (l_bp + n_bp) w_bp + o u_b
                                         offline: step_b: tau_b >= sum t^T x + sum t^S z + o u_b
                                           (the one-off teacher pass is charged to the steps it
                                           feeds; t^S includes reading the cached outputs)
  fidelity floor     (``_add_fidelity``) fidelity_floor:    sum_b k_b u_b >= min_topk
  bytes stage        (``min_bytes``)     near_optimal:      objective <= bound, then min bytes moved per
                                         step, sum_b beta_b (fewer bytes on the wire among ties; the
                                         bound is kdplan.search.choose's, (1 + TIE_TOLERANCE) x optimum)
  runner-ups         (``exclude``)       exclude_n:         u_b + x_bi + z_bj <= 2 for a found optimum
                                         (``next_best`` then solves for the best one left)
  pins               enforced when the candidate sets are built (kdplan.search.candidates): a
                     pinned key has one value in every T_b and S_b, so it needs no row here.

Statuses (``_status``): optimal (proven within [solver] mip_gap); time_limit (stopped at [solver]
time_limit_s with a layout in hand: planned, with the gap the solver reports); no_solution
(stopped at the limit before any layout: ``SolverLimit``, exit 1, never taken for "nothing
fits"); infeasible (proven: ``Infeasible``, exit 3).

Because exactly one u_b is 1 and every x, z of the other blocks is then 0, each tau_b is the
composition rule of kdplan.cost.api for the chosen block (disaggregated: max(T, S) + exposed
transfer = max(T, S, l) + n) and 0 elsewhere: no big-M is needed. Tests check the optimum
against brute force over every combination priced by kdplan.cost.compose.

beta_b, the bytes a chosen configuration of block b moves per step (GB): sum y_bk c_bk co-located,
else the teacher's and student's own bytes (sum y x, sum y z) plus the pairs' (sum y_bp w_bp).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulp

from ..errors import Infeasible, SolverLimit
from ..schema.compression import Compression
from .candidates import Arrangement, Option

if TYPE_CHECKING:
    from ..cost.api import RolePrice

Signature = tuple[int, ...]  # what a teacher-output transfer depends on: (tp, pp, dp[, micro-batches per step])
PairPrice = tuple[float, float, float]  # (link time l s, pipeline-fill share n s, bytes per step)
ComboPrice = tuple[float, float, float]  # co-located pair: (step s, memory GiB per GPU, bytes per step)


@dataclass
class Priced:
    """One layout option with its price under one block's compression."""

    option: Option
    time_s: float
    memory_gib: float
    price: RolePrice | None = None  # the cost model's full price (None: a stand-in, kdplan.search.bruteforce)
    sig: Signature = ()  # transfer signature (empty: no transfer, offline or no teacher)
    bytes: float = 0.0  # bytes over links per step (the bytes stage)


@dataclass
class Block:
    """One (arrangement, compression) pair and the layouts it may use."""

    arrangement: Arrangement
    compression: Compression
    overhead_s: float
    teacher: list[Priced]
    student: list[Priced]
    pairs: dict[tuple[Signature, Signature], PairPrice]  # (teacher sig, student sig) -> its price
    memory_limit_gib: float
    teacher_memory_limit_gib: float
    usd_per_s: float
    fidelity_k: int
    combos: dict[tuple[int, int], ComboPrice] | None = None  # co-located: (i, j) -> priced pair

    @property
    def kind(self) -> str:
        a = self.arrangement
        return a.mode if a.mode != "online" else a.placement

    @property
    def colocated(self) -> bool:
        return self.kind == "colocated"

    @property
    def disaggregated(self) -> bool:
        return self.kind == "disaggregated"

    def step(self, i: int | None, j: int) -> float:
        """The composition rule for one (teacher, student) choice: what tau_b equals."""
        if self.combos is not None:
            return self.combos[i, j][0]
        s = self.student[j].time_s
        if i is None:
            return s + self.overhead_s
        t = self.teacher[i].time_s
        l, n, _ = self.pairs.get((self.teacher[i].sig, self.student[j].sig), (0.0, 0.0, 0.0))
        if self.disaggregated:
            return max(t, s, l) + n + self.overhead_s
        return t + s + l + self.overhead_s  # offline: the one-off teacher pass charged to the step

    def lower_bound(self) -> float:
        """A step time no choice in this block beats (s): cheap, from the priced data alone."""
        if self.combos is not None:
            return min(c[0] for c in self.combos.values())
        s = min(priced.time_s for priced in self.student)
        if not self.teacher:
            return s + self.overhead_s
        t = min(priced.time_s for priced in self.teacher)
        link = min((v[0] for v in self.pairs.values()), default=0.0)
        if self.disaggregated:
            return max(t, s, link) + self.overhead_s
        return t + s + link + self.overhead_s

    def memory(self, i: int | None, j: int) -> float:
        if self.combos is not None:
            return self.combos[i, j][1]
        s = self.student[j].memory_gib
        return s if i is None else max(s, self.teacher[i].memory_gib)


@dataclass
class Choice:
    """One configuration: block b, teacher layout i (None: no teacher), student layout j."""

    block: int
    teacher: int | None
    student: int
    objective: float


class KDProgram:
    """Builds the ILP above over ``blocks``; solves it for its optimum (``optimum``, ``best``), the
    bytes stage (``min_bytes``) and the next configuration after cuts (``next_best``)."""

    def __init__(self, blocks: list[Block], *, num_gpus: int, gpus_used: list[int], objective: str = "time",
                 tokens_per_step: float = 1.0, min_topk: int | None = None):
        self.blocks = blocks
        self.prob = pulp.LpProblem("kd_plan", pulp.LpMinimize)
        self.u, self.x, self.z, self.w, self.c, self.tau = {}, {}, {}, {}, {}, {}
        for b, blk in enumerate(blocks):
            self.u[b] = self.prob.add_variable(f"u_{b}", cat="Binary")
            self.tau[b] = self.prob.add_variable(f"tau_{b}", lowBound=0)
            for i in range(len(blk.teacher)):
                self.x[b, i] = self.prob.add_variable(f"x_{b}_{i}", cat="Binary")
            for j in range(len(blk.student)):
                self.z[b, j] = self.prob.add_variable(f"z_{b}_{j}", cat="Binary")
            if blk.combos is not None:  # co-located: one binary per priced (teacher, student) pair
                for k, (i, j) in enumerate(blk.combos):
                    self.c[b, i, j] = self.prob.add_variable(f"c_{b}_{k}", cat="Binary")
            elif blk.pairs:  # every (teacher signature, student signature) pair, zero-cost ones too
                sigs = [(ts, ss) for ts in sorted({priced.sig for priced in blk.teacher})
                        for ss in sorted({priced.sig for priced in blk.student})]
                for n, p in enumerate(sigs):
                    # an unpriced pair cannot be chosen: never take a transfer as free
                    self.w[b, p] = self.prob.add_variable(f"w_{b}_{n}", lowBound=0, upBound=1 if p in blk.pairs else 0)
        self._objective(objective, tokens_per_step)
        self._add_choice()
        self._add_budget(num_gpus, gpus_used)
        self._add_memory()
        self._add_pairs()
        self._add_step()
        self._add_fidelity(min_topk)
        self._cuts = 0
        self._primary = None  # (solver, status, gap, choice) of the last optimum() probe
        self.limit_gaps: list[float | None] = []  # gap of each objective solve stopped at its time limit

    # ---- objective and constraint families (see the module docstring) -----------------------
    def _objective(self, objective: str, tokens_per_step: float) -> None:
        if objective == "cost":
            self.prob += pulp.lpSum(blk.usd_per_s / tokens_per_step * 1e6 * self.tau[b]
                                    for b, blk in enumerate(self.blocks)), "usd_per_million_tokens"
        else:
            self.prob += pulp.lpSum(self.tau.values()), "step_time_s"
        self.objective = objective

    def _add_choice(self) -> None:
        self.prob += pulp.lpSum(self.u.values()) == 1, "choose_one"
        for b, blk in enumerate(self.blocks):
            if blk.teacher:
                self.prob += pulp.lpSum(self.x[b, i] for i in range(len(blk.teacher))) == self.u[b], f"teacher_layout_{b}"
            self.prob += pulp.lpSum(self.z[b, j] for j in range(len(blk.student))) == self.u[b], f"student_layout_{b}"

    def _add_budget(self, num_gpus: int, gpus_used: list[int]) -> None:
        self.prob += pulp.lpSum(g * self.u[b] for b, g in enumerate(gpus_used)) <= num_gpus, "gpu_budget"

    def _teacher_sum(self, b: int, attr: str):
        return pulp.lpSum(getattr(priced, attr) * self.x[b, i] for i, priced in enumerate(self.blocks[b].teacher))

    def _student_sum(self, b: int, attr: str):
        return pulp.lpSum(getattr(priced, attr) * self.z[b, j] for j, priced in enumerate(self.blocks[b].student))

    def _add_memory(self) -> None:
        for b, blk in enumerate(self.blocks):
            if blk.combos is not None:
                continue  # co-located pairs were priced stage by stage and only those that fit kept
            else:
                if blk.teacher:
                    self.prob += (self._teacher_sum(b, "memory_gib")
                                  <= blk.teacher_memory_limit_gib * self.u[b]), f"memory_teacher_{b}"
                self.prob += self._student_sum(b, "memory_gib") <= blk.memory_limit_gib * self.u[b], f"memory_student_{b}"

    def _add_pairs(self) -> None:
        for b, blk in enumerate(self.blocks):
            if blk.combos is not None:
                by_i: dict[int, list] = {}
                by_j: dict[int, list] = {}
                for i, j in blk.combos:
                    by_i.setdefault(i, []).append(self.c[b, i, j])
                    by_j.setdefault(j, []).append(self.c[b, i, j])
                for i in range(len(blk.teacher)):
                    self.prob += self.x[b, i] == pulp.lpSum(by_i.get(i, [])), f"combo_teacher_{b}_{i}"
                for j in range(len(blk.student)):
                    self.prob += self.z[b, j] == pulp.lpSum(by_j.get(j, [])), f"combo_student_{b}_{j}"
                continue
            tsig = {priced.sig for priced in blk.teacher}
            ssig = {priced.sig for priced in blk.student}
            if not blk.pairs:
                continue
            for n, ts in enumerate(sorted(tsig)):
                xs = [self.x[b, i] for i, priced in enumerate(blk.teacher) if priced.sig == ts]
                self.prob += pulp.lpSum(self.w[b, (ts, ss)] for ss in ssig) == pulp.lpSum(xs), f"pair_teacher_{b}_{n}"
            for n, ss in enumerate(sorted(ssig)):
                zs = [self.z[b, j] for j, priced in enumerate(blk.student) if priced.sig == ss]
                self.prob += pulp.lpSum(self.w[b, (ts, ss)] for ts in tsig) == pulp.lpSum(zs), f"pair_student_{b}_{n}"

    def _add_step(self) -> None:
        for b, blk in enumerate(self.blocks):
            if blk.combos is not None:
                self.prob += self.tau[b] >= pulp.lpSum(blk.combos[i, j][0] * self.c[b, i, j] for i, j in blk.combos), f"step_{b}"
                continue
            t_teacher = self._teacher_sum(b, "time_s")
            t_student = self._student_sum(b, "time_s")
            o = blk.overhead_s * self.u[b]
            pairs = self._pair_terms(b)
            link = pulp.lpSum(l * w for w, (l, _, _) in pairs)
            fill = pulp.lpSum(n * w for w, (_, n, _) in pairs)
            if blk.disaggregated:
                self.prob += self.tau[b] >= t_teacher + fill + o, f"step_teacher_{b}"
                self.prob += self.tau[b] >= t_student + fill + o, f"step_student_{b}"
                self.prob += self.tau[b] >= link + fill + o, f"step_link_{b}"
            else:
                self.prob += self.tau[b] >= t_teacher + t_student + link + o, f"step_{b}"

    def _pair_terms(self, b: int) -> list:
        """(w_bp, (link s, fill s, bytes)) for the signature pairs block b's layouts can form. A
        priced pair whose signature no remaining layout has is ignored (indexing w by the priced
        pairs raised KeyError on a --gpus 2 job); an unpriced one has w fixed at 0."""
        pairs = self.blocks[b].pairs
        return [(w, pairs.get(p, (0.0, 0.0, 0.0))) for (bb, p), w in self.w.items() if bb == b]

    def _add_fidelity(self, min_topk: int | None) -> None:
        if min_topk is not None:
            self.prob += pulp.lpSum(blk.fidelity_k * self.u[b] for b, blk in enumerate(self.blocks)) >= min_topk, "fidelity_floor"

    def exclude(self, c: Choice) -> None:
        """Cut off a found configuration so the next solve returns the runner-up."""
        terms = [self.u[c.block], self.z[c.block, c.student]]
        if c.teacher is not None:
            terms.append(self.x[c.block, c.teacher])
        self.prob += pulp.lpSum(terms) <= len(terms) - 1, f"exclude_{self._cuts}"
        self._cuts += 1

    # ---- solve and decode -------------------------------------------------------------------
    def restrict(self, keep) -> None:
        """Allow only the blocks for which ``keep(block)`` is true (u_b fixed at 0 elsewhere):
        one program serves the optimum of several sub-spaces without being rebuilt."""
        for b, blk in enumerate(self.blocks):
            self.u[b].upBound = 1 if keep(blk) else 0
        self._primary = None

    def optimum(self, *, solver: str = "highs", time_limit_s: float = 60.0, gap: float = 0.0) -> float:
        """The objective's optimum alone (inf when infeasible): a probe, no tie-break. ``best``
        right after (same restriction) starts from it instead of solving again."""
        name, status, sol_gap = self._solve_once(solver, time_limit_s, gap)
        if status == "no_solution":
            raise SolverLimit(time_limit_s)
        if status == "time_limit":
            self.limit_gaps.append(sol_gap)
        self._primary = (name, status, sol_gap, None if status == "infeasible" else self._decode())
        return float("inf") if status == "infeasible" else self._primary[3].objective

    def best(self, *, solver: str = "highs", time_limit_s: float = 60.0,
             gap: float = 0.0) -> tuple[str, str, float | None, Choice]:
        """(solver, status, gap, choice) of the objective's optimum: the last ``optimum`` probe's
        when it is still loaded (same restriction), else solved now."""
        if self._primary is None:
            name, status, sol_gap = self._solve_once(solver, time_limit_s, gap)
            best = None
            if status == "time_limit":
                self.limit_gaps.append(sol_gap)
        else:
            name, status, sol_gap, best = self._primary
        if status == "no_solution":
            raise SolverLimit(time_limit_s)
        if status == "infeasible":
            raise Infeasible("no configuration satisfies the memory, GPU and fidelity constraints", binding="ilp")
        return name, status, sol_gap, best or self._decode()

    def min_bytes(self, bound: float, *, solver: str = "highs", time_limit_s: float = 60.0,
                  gap: float = 0.0) -> Choice | None:
        """The bytes stage: the configuration with objective <= ``bound`` that moves the fewest
        bytes per step (None when the solver finds none)."""
        primary = self.prob.objective
        # The bound is released afterwards through a slack whose upper bound goes from 0 to none.
        slack = self.prob.add_variable(f"near_optimal_slack_{self._cuts}", lowBound=0, upBound=0)
        self.prob += primary <= bound + slack, f"near_optimal_{self._cuts}"
        self.prob.setObjective(pulp.lpSum(self._bytes(b) for b in range(len(self.blocks))))
        _, st, _ = self._solve_once(solver, time_limit_s, gap)
        self.prob.setObjective(primary)
        choice = self._decode() if st in ("optimal", "time_limit") else None
        slack.upBound = None
        self._primary = None  # the loaded solution is no longer the probe's
        return choice

    def next_best(self, *, solver: str = "highs", time_limit_s: float = 60.0, gap: float = 0.0) -> Choice | None:
        """The best configuration the cuts (``exclude``) leave, or None when none is left."""
        _, st, _ = self._solve_once(solver, time_limit_s, gap)
        self._primary = None
        return None if st in ("infeasible", "no_solution") else self._decode()

    @property
    def num_variables(self) -> int:
        return len(self.u) + len(self.x) + len(self.z) + len(self.w) + len(self.tau)

    def _bytes(self, b: int):
        blk = self.blocks[b]
        if blk.combos is not None:
            return pulp.lpSum(blk.combos[i, j][2] * self.c[b, i, j] for i, j in blk.combos) / 1e9
        pairs = pulp.lpSum(by * w for w, (_, _, by) in self._pair_terms(b))
        return (self._teacher_sum(b, "bytes") + self._student_sum(b, "bytes") + pairs) / 1e9  # GB

    def _solve_once(self, solver: str, time_limit_s: float, gap: float):
        """(solver name, status, relative gap) of one solve. Status is one of ``STATUSES``:
        "optimal" (proven within ``gap``), "time_limit" (stopped at the limit with a layout in
        hand, not proven; gap as the solver reports it), "no_solution" (stopped at the limit
        before finding any layout) or "infeasible" (proven: nothing satisfies the constraints)."""
        cmd = _make_solver(solver, time_limit_s, gap)
        try:
            with _quiet_stdout():
                self.prob.solve(cmd)
            name = solver
        except pulp.PulpSolverError:
            if solver == "cbc":
                raise
            with _quiet_stdout():
                self.prob.solve(_make_solver("cbc", time_limit_s, gap))
            name = "cbc"
        return (name, *_status(self.prob, name, gap))

    @property
    def time_limited(self) -> bool:
        """A solve of this program's objective (``optimum`` or ``best``; not the bytes stage
        or the runner-ups) stopped at its time limit: its optimum is not proven."""
        return bool(self.limit_gaps)

    @property
    def limit_gap(self) -> float | None:
        """The widest gap among the time-limited solves (None: unknown, or none stopped)."""
        gaps = self.limit_gaps
        return None if not gaps or any(g is None for g in gaps) else max(gaps)

    def _decode(self) -> Choice:
        b = max(self.u, key=lambda k: self.u[k].value() or 0.0)
        blk = self.blocks[b]
        j = max(range(len(blk.student)), key=lambda k: self.z[b, k].value() or 0.0)
        i = None
        if blk.teacher:
            i = max(range(len(blk.teacher)), key=lambda k: self.x[b, k].value() or 0.0)
        return Choice(b, i, j, pulp.value(self.prob.objective))


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints its banner from C++ on fd 1 even with output off; `plan --json` owns stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.close(null)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


STATUSES = ("optimal", "time_limit", "no_solution", "infeasible")


def _status(prob, name: str, gap: float) -> tuple[str, float | None]:
    """Read the solver's own status: pulp maps a HiGHS time limit to "integer feasible" whether
    or not a layout was found, so HiGHS is asked directly (its model status and whether its
    primal solution is feasible)."""
    model = getattr(prob, "solverModel", None)
    if name == "highs" and model is not None and hasattr(model, "getModelStatus"):
        import highspy
        ms, info = model.getModelStatus(), model.getInfo()
        if ms == highspy.HighsModelStatus.kOptimal:
            return "optimal", gap if gap > 0 else 0.0
        if ms in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible", None
        if ms in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kIterationLimit,
                  highspy.HighsModelStatus.kInterrupt):
            if info.primal_solution_status == int(highspy.SolutionStatus.kSolutionStatusFeasible):
                g = info.mip_gap
                return "time_limit", g if 0 <= g < float("inf") else None
            return "no_solution", None
        raise RuntimeError(f"HiGHS stopped with model status {model.modelStatusToString(ms)}")
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal", gap if gap > 0 else 0.0
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit", None  # CBC: stopped on its limit with a solution
    if prob.sol_status == pulp.LpSolutionInfeasible or pulp.LpStatus[prob.status] == "Infeasible":
        return "infeasible", None
    return "no_solution", None  # CBC: not solved, no solution (its time limit)


def _make_solver(solver: str, time_limit_s: float, gap: float):
    if solver == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap)
    # HiGHS's presolve spends seconds probing these small, nearly-tied models (measured 5 s
    # with it, 0.2 s without on the 32-GPU seed problem); the models are small enough without.
    return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, presolve="off")
