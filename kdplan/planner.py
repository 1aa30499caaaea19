"""The planner: Problem -> Plan (candidates -> prices -> ILP -> check -> plan).

``make_plan(problem)`` is the one entry point. ``Planner`` keeps the caches (layouts, prices,
finished plans keyed on the resolved inputs) so that ``kdplan whatif`` can call it hundreds of
times; ``make_plan`` uses one module-level ``Planner``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
import warnings
from collections import OrderedDict
from dataclasses import replace

from . import __version__
from .errors import Infeasible
from .pins import check_layout_pins
from .problem import Problem, ProblemCache
from .schema import Plan
from .schema.plan import Alternative, JobSummary, KDPlan, RolePlan, SolverInfo
from .search import candidates as cand
from .search.decode import candidate_summary, finalize_layout, gpu_of_rank, role_bases
from .search.diagnose import diagnose
from .search.fidelity import choose_format
from .search.ilp import TIE_TOLERANCE, KDProgram
from .search.space import Space, arrangements


def _default_pricer():
    from . import cost
    return cost


def problem_key(problem: Problem) -> str:
    """A hash of everything a plan depends on."""
    parts = [problem.job.model_dump_json(exclude={"run"}), problem.student.model_dump_json(),
             problem.teacher.model_dump_json() if problem.teacher else "none",
             problem.cluster.model_dump_json(), json.dumps(problem.pins, sort_keys=True, default=str)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def content_key(problem: Problem) -> str:
    """A hash of what the cost model reads: the job (not its run section), models and cluster;
    not the pins, which only filter the candidates."""
    parts = [problem.job.model_dump_json(exclude={"run"}), problem.student.model_dump_json(),
             problem.teacher.model_dump_json() if problem.teacher else "none", problem.cluster.model_dump_json()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def price_key(problem: Problem) -> str:
    """A hash of what a role's price reads (kdplan.cost.role.price_role): the job without its
    size, cluster name, token budget and pins, the models, and the cluster's overheads, GPU specs
    and node of each group, but not how many nodes each group has. A layout's price never depends
    on the cluster's size beyond the GPUs the layout itself uses (and the layout is in the
    price's own key), so problems that differ only in GPU count can share prices."""
    cl = problem.cluster
    hw = json.dumps([cl.overheads.model_dump(mode="json"), [g.node.model_dump(mode="json") for g in cl.groups],
                     {k: v.model_dump(mode="json") for k, v in sorted(cl.gpus.items())}], sort_keys=True)
    parts = [problem.job.model_dump_json(exclude={"run", "gpus", "cluster", "tokens", "fix"}),
             problem.student.model_dump_json(), problem.teacher.model_dump_json() if problem.teacher else "none", hw]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


MAX_SHARED_PRICES = 400_000  # role prices kept across problems of one price_key (a memory bound)


class Planner:
    """Plans problems, reusing finished plans for identical inputs (an LRU of ``max_plans``).

    The planner owns the problems' caches (``kdplan.problem.ProblemCache``) and decides which
    problems share one:

    - problems of one ``content_key`` (they differ only in their pins: a what-if sweep over
      kd.compression or a layout key) share the whole cache (layer times, role prices,
      baselines, layout lists): the cost model never reads the pins, so a price is the same in
      both, and the layout lists carry the pins in their keys;
    - problems of one ``price_key`` (they differ only in GPU count) share the prices, and on
      one-group clusters the layout lists.

    The last ``max_shared`` contents and price keys are kept."""

    def __init__(self, pricer=None, max_plans: int = 256, max_shared: int = 2):
        self.pricer = pricer
        self.max_plans = max_plans
        self.max_shared = max_shared
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._shared: OrderedDict[str, Problem] = OrderedDict()
        self._prices: OrderedDict[str, ProblemCache] = OrderedDict()  # by price_key: prices, layouts

    def _share_prices(self, problem: Problem) -> Problem:
        """Problems of one ``price_key`` (a what-if sweep over GPU counts) share the cost
        model's role-price memo: the same layout on the same GPU type is priced once."""
        key = price_key(problem)
        memo = problem.memo()  # the problem's own cache (empty for a new problem)
        shared = self._prices.get(key)
        if shared is None or len(shared.prices) > MAX_SHARED_PRICES:
            self._prices[key] = shared = ProblemCache(prices=memo.prices)
            if len(self._prices) > self.max_shared:
                self._prices.popitem(last=False)
        self._prices.move_to_end(key)
        if shared.prices is not memo.prices:
            shared.prices.update(memo.prices)
            memo.prices = shared.prices
        if len(problem.cluster.groups) == 1 and not memo.layouts:
            # The search's layout lists (search.space.Space.options, keyed on the role's GPU count,
            # its pins and the teacher precisions) read the same inputs as a price, plus the group
            # sizes when a student spans several groups: shared on one-group clusters only.
            memo.layouts = shared.layouts
        return problem

    def _share(self, problem: Problem) -> Problem:
        key = content_key(problem)
        canon = self._shared.get(key)
        if canon is None:
            self._shared[key] = problem
            if len(self._shared) > self.max_shared:
                self._shared.popitem(last=False)
            return self._share_prices(problem)
        self._shared.move_to_end(key)
        # The same objects, so the cache (keyed on their ids) stays valid, and the same cache.
        out = replace(problem, job=canon.job, teacher=canon.teacher, student=canon.student, cluster=canon.cluster)
        out.cache = canon.cache
        return out

    def plan(self, problem: Problem, *, top_k: int | None = None) -> Plan:
        k = top_k if top_k is not None else problem.job.solver.top_k_alternatives
        key = f"{problem_key(problem)}:{k}"
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key].model_copy(deep=True)
        plan = self._solve(self._share(problem), k)
        self._plans[key] = plan
        if len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return plan.model_copy(deep=True)

    def search(self, problem: Problem, *, top_k: int = 0):
        """Build the space and solve the ILP; returns (space, blocks, solution).

        Teacher precision (``problem.teacher_precisions``, from --teacher-precision auto): a
        quantized teacher changes the teacher's outputs, so like a lossy teacher-output format
        it is taken only when it buys more than ``TIE_TOLERANCE``: the space with every allowed
        precision and the space with the exact bf16 teacher are both solved, and the exact one
        wins unless the other's optimum is more than the tolerance better."""
        precs = problem.teacher_precisions if problem.teacher is not None else ("bf16",)
        if len(precs) == 1:
            out = self._search(problem, top_k=top_k)
            out[2].teacher_precision_reason = _precision_reason(problem, precs[0])
            return out
        full = self._search(problem, top_k=top_k)
        exact_problem = replace(problem, teacher_precisions=("bf16",))
        exact_problem.cache = problem.cache  # same inputs: share the prices and the layout lists
        try:
            exact = self._search(exact_problem, top_k=top_k)
        except Infeasible:
            exact = None
        fo = full[2].optimum
        unit = "$/M tokens" if problem.job.solver.objective == "cost" else "s/step"
        low = "/".join(precs[1:])
        if exact is not None and exact[2].optimum <= fo * (1 + TIE_TOLERANCE) + 1e-12:
            gain = exact[2].optimum / fo - 1
            exact[2].teacher_precision_reason = (
                f"auto: the exact teacher; a quantized one ({low}) would gain only {max(gain, 0.0):.1%} "
                f"(within the {TIE_TOLERANCE:.0%} tie tolerance)")
            return exact
        sol, blocks = full[2], full[1]
        best = sol.choices[0]
        chosen = blocks[best.block].teacher[best.teacher].option.layout.forward_precision \
            if best.teacher is not None else "bf16"
        if exact is None:
            why = "the exact bf16 teacher does not fit"
        else:
            eo = exact[2].optimum
            why = (f"{eo / fo - 1:.1%} better than the best plan with the exact bf16 teacher "
                   f"({fo:.4g} vs {eo:.4g} {unit}), beyond the {TIE_TOLERANCE:.0%} tie tolerance")
        sol.teacher_precision_reason = f"auto: {chosen} weights; {why}"
        return full

    def _search(self, problem: Problem, *, top_k: int = 0):
        pricer = self.pricer or _default_pricer()
        space = Space(problem, pricer)
        comps = cand.compressions(problem)
        if problem.teacher is not None and not comps:
            raise Infeasible("no teacher-output compression is left after kd.allowed_compressions, "
                             f"--min-topk {problem.job.kd.min_topk} and the kd.compression pin",
                             binding="fidelity floor", suggestion="lower --min-topk or allow dense")
        arrs = arrangements(problem)
        if not arrs:
            pins = {k: v for k, v in problem.pins.items() if k.startswith("kd.") or k.endswith(".gpu")}
            hint = ("; on a mixed cluster co-located roles share one group, disaggregated roles use two "
                    "different groups and offline KD runs the teacher on every group"
                    if any(k.endswith(".gpu") for k in pins) else "")
            raise Infeasible(f"no placement satisfies --fix {pins}{hint}", binding="pin")
        _check_role_pins(problem, space, arrs)
        blocks = space.blocks(arrs, comps)
        if not blocks:
            diagnose(problem, space, arrs, comps, pricer)
        s = problem.job.solver

        def program(blks):
            return KDProgram(blks, num_gpus=problem.num_gpus, gpus_used=[b.arrangement.gpus_used for b in blks],
                             objective=s.objective, tokens_per_step=problem.job.global_batch * problem.job.seq_len,
                             min_topk=problem.job.kd.min_topk if problem.teacher is not None else None)
        kw = dict(solver=s.solver, time_limit_s=s.time_limit_s, gap=s.mip_gap)
        tokens = problem.job.global_batch * problem.job.seq_len
        main = program(blocks)
        optimum = main.optimum(**kw)
        if optimum == float("inf"):
            diagnose(problem, space, arrs, comps, pricer, colocated_sum=True)
            raise Infeasible("no configuration satisfies the memory, GPU and fidelity constraints", binding="ilp")
        # The fastest plan uses the lossiest formats; take the most faithful one within tolerance,
        # then the fewest bytes among the ties and the runner-ups, in that format's space.
        prog, reason = choose_format(problem, space, arrs, comps, main, optimum, program, kw,
                                     lambda b: b.usd_per_s / tokens * 1e6 if s.objective == "cost" else 1.0)
        sol = prog.solve(**kw, runner_ups=top_k, reference=optimum)
        sol.optimum, sol.compression_reason, blocks = optimum, reason, prog.blocks
        if main.time_limited:  # the reference optimum (or a format probe) is not proven either
            gaps = [main.limit_gap, sol.gap if sol.status == "time_limit" else 0.0]
            sol.status, sol.gap = "time_limit", None if None in gaps else max(gaps)
        return space, blocks, sol

    def _solve(self, problem: Problem, top_k: int) -> Plan:
        t0 = time.perf_counter()
        pricer = self.pricer or _default_pricer()
        space, blocks, sol = self.search(problem, top_k=top_k)
        best = sol.choices[0]
        blk = blocks[best.block]
        arr, comp = blk.arrangement, blk.compression
        teacher = blk.teacher[best.teacher] if best.teacher is not None else None
        student = blk.student[best.student]
        c = space.candidate(arr, comp, teacher, student)
        pred = pricer.evaluate(problem, c)
        check_prediction(pred, blk.step(best.teacher, best.student), arr.mode)
        status = "fixed" if space.num_combos == 1 else sol.status
        alts = []
        for ch in sol.choices[1:]:
            b = blocks[ch.block]
            t = b.teacher[ch.teacher] if ch.teacher is not None else None
            st = b.student[ch.student]
            alts.append(Alternative(summary=candidate_summary(b.arrangement, b.compression, t.option.layout if t else None,
                                                              st.option.layout, st.option.stage_layers),
                                    step_time_s=b.step(ch.teacher, ch.student),
                                    memory_per_gpu_gib=b.memory(ch.teacher, ch.student)))
        plan = build_plan(problem, space, arr, c, pred, SolverInfo(
            name="fixed" if status == "fixed" else sol.solver, status=status,
            solve_time_s=time.perf_counter() - t0, num_candidates=space.num_combos,
            objective=problem.job.solver.objective, gap=sol.gap), alts)
        if problem.teacher is not None:
            plan.kd.compression_reason = sol.compression_reason
            plan.kd.teacher_precision_reason = sol.teacher_precision_reason
        return plan


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


def check_prediction(pred, ilp_step_s: float, mode: str) -> None:
    """The decoded plan, re-priced by cost.evaluate, must cost what the ILP said it would."""
    step = pred.step_time_s
    if mode == "offline" and pred.offline is not None:
        step += pred.offline.teacher_pass_s_per_step  # the ILP charges the one-off pass to the step
    if abs(step - ilp_step_s) > 1e-6 * max(1.0, step):
        warnings.warn(f"cost.evaluate gives {step:.6g} s for the chosen plan but the ILP composed "
                      f"{ilp_step_s:.6g} s", stacklevel=3)


def _check_role_pins(problem, space, arrs) -> None:
    """A pin that leaves a role without any valid layout is named before anything is priced."""
    counts = {"student": sum(len(space.options("student", a.student_gpus, a.student_groups, False)) for a in arrs)}
    if problem.teacher is not None:
        counts["teacher"] = sum(len(space.teacher_options(a, False)) for a in arrs if a.mode != "train")
    check_layout_pins(problem.pins, counts)


def build_plan(problem: Problem, space, arr, c, pred, solver: SolverInfo, alts) -> Plan:
    cl, job = problem.cluster, problem.job
    tbase, sbase = role_bases(arr, cl)
    gpu_of = lambda r: gpu_of_rank(cl, arr, r)  # noqa: E731
    student = finalize_layout(c.student, problem.student.num_layers, sbase, c.student_stage_layers, gpu_of)
    teacher = None
    if problem.teacher is not None and c.teacher is not None:
        tl = finalize_layout(c.teacher, problem.teacher.num_layers, tbase, None, gpu_of)
        teacher = RolePlan(source=str(job.teacher), model=problem.teacher, layout=tl)
    world = arr.gpus_used
    kd = KDPlan(mode="offline" if arr.mode == "offline" else "online", placement=arr.placement,
                loss=job.kd.loss, temperature=job.kd.temperature, alpha=job.kd.alpha, beta=job.kd.beta,
                compression=c.compression if problem.teacher is not None else "dense",
                hidden_state_dim=job.kd.hidden_state_dim)
    g0 = cl.groups[0].node
    summary = JobSummary(cluster=cl.name, gpus=world, gpus_per_node=g0.gpus_per_node,
                         gpu_types=[g.node.gpu for g in cl.groups], device_kind=cl.gpu_of_group(0).kind,
                         seq_len=job.seq_len, global_batch=job.global_batch, precision=job.precision,
                         tokens=job.tokens)
    return Plan(kdplan_version=__version__, created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                job=summary, teacher=teacher, student=RolePlan(source=job.student, model=problem.student, layout=student),
                kd=kd, prediction=pred, solver=solver, alternatives=alts, run=job.run, world_size=world)


_PLANNER = Planner()


def make_plan(problem: Problem, *, top_k: int | None = None, pricer=None) -> Plan:
    """Choose the best plan for ``problem`` (cached on its resolved inputs)."""
    if pricer is not None:
        return Planner(pricer).plan(problem, top_k=top_k)
    return _PLANNER.plan(problem, top_k=top_k)
