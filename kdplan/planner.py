"""The planner: Problem -> Plan (enumerate -> price -> choose -> check -> plan).

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
from .schema.capability import executor_check
from .schema.plan import Alternative, JobSummary, KDPlan, RolePlan, SolverInfo
from .search import candidates as cand
from .search import job as job_search
from .search import sequence
from .search.choose import TIE_TOLERANCE, Solution, choose
from .search.decode import candidate_summary, finalize_layout, gpu_of_rank, role_bases
from .search.diagnose import diagnose
from .search.ilp import Block
from .search.space import Pricer, PricedSpace, Space


def _default_pricer():
    from . import cost
    return cost


def problem_key(problem: Problem) -> str:
    """A hash of everything a plan depends on."""
    parts = [problem.job.model_dump_json(exclude={"run"}), problem.student.model_dump_json(),
             problem.teacher.model_dump_json() if problem.teacher else "none",
             problem.cluster.model_dump_json(), json.dumps(problem.pins, sort_keys=True, default=str)]
    parts += ["teacher pass apart"] if problem.teacher_pass_apart else []
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
    and node of each group, but not how many nodes each group has nor the node's storage. A
    layout's price never depends on the cluster's size beyond the GPUs the layout itself uses (and
    the layout is in the price's own key), nor on where a cache would be stored (only the
    teacher-output transfer reads a storage tier, kdplan.cost.compose.price_transfer, and it is not
    memoised), so problems that differ only in GPU count or storage can share prices: a whole job
    plans its students on the cluster with one tier or the other (kdplan.search.job._with_read)."""
    cl = problem.cluster
    nodes = [g.node.model_dump(mode="json", exclude={"local_storage"}) for g in cl.groups]
    hw = json.dumps([cl.overheads.model_dump(mode="json"), nodes,
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

    def __init__(self, pricer: Pricer | None = None, max_plans: int = 256, max_shared: int = 2):
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
        if problem.kd_signal == "sequence":
            plan = self._solve_sequence(problem, k)
        else:
            plan = self._solve(self._share(problem), k)
        if job_search.wants_job(problem):
            job, step_problem = job_search.plan_job(lambda p: self.plan(p, top_k=0), problem, plan)
            if step_problem is not None:
                plan = self._adopt(problem, step_problem, job, k)
            plan.prediction.job = job
            if job.strategy == "online_fanout":  # one run trains every student
                plan.extra_students = job_search.fanout_students(lambda p: self.plan(p, top_k=0), problem, plan)
            elif job.strategy == "offline":  # one run: the teacher pass, then the students
                plan.extra_students = job_search.offline_students(lambda p: self.plan(p, top_k=0), problem, job, plan)
        plan.executor = executor_check(plan)
        if problem.job.solver.runnable and not plan.executor.runnable:
            # the layouts were filtered (candidates.role_options); what is left is the job's own
            # choice (precision, signal, students) or a teacher/student pairing
            raise Infeasible(f"--runnable: `kdplan run` does not execute what this job needs:"
                             f" {plan.executor.unsupported[0]}", binding="executor capability",
                             suggestion="plan without --runnable to see the plan it cannot run")
        self._plans[key] = plan
        if len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return plan.model_copy(deep=True)

    def _adopt(self, problem: Problem, step_problem: Problem, job, top_k: int) -> Plan:
        """The step plan the whole job runs (kdplan.search.job chose a strategy whose step is not
        the single-step optimum, e.g. offline from a cache): its kd block, layouts and prediction,
        with the job's own inputs (token budget, dataset) in its job summary."""
        plan = self.plan(step_problem, top_k=top_k)
        plan.job = plan.job.model_copy(update={"tokens": problem.job.tokens,
                                               "dataset_tokens": problem.job.dataset_tokens})
        if job.cache_format is None:  # online_fanout: the first student re-planned as one run trains them all
            return plan
        # the step problem pins kd.mode and kd.compression; the reason is the job's, not a user's pin
        uses = ("its first epoch computes the teacher's outputs online and writes them, later epochs and other"
                " students read them" if job.strategy == "online_then_cache" else "every step reads it")
        plan.kd.compression_reason = (f"the whole job runs {job.strategy} (prediction.job): {job.cache_format}, the"
                                      f" most faithful allowed format whose cache fits {job.cache_storage}; {uses}")
        return plan

    def search(self, problem: Problem, *, top_k: int = 0) -> tuple[Space, list[Block], Solution]:
        """Enumerate and price the space (``price``), then choose: kdplan.search.choose states the
        policy. Returns (the chosen space, the blocks the solution indexes, the solution)."""
        return choose(problem, self.price, top_k=top_k)

    def price(self, problem: Problem) -> PricedSpace:
        """The problem's space, enumerated (kdplan.search.candidates) and priced into ILP blocks
        (kdplan.search.space); Infeasible when a pin or the memory leaves nothing to choose from."""
        pricer = self.pricer or _default_pricer()
        space = Space(problem, pricer)
        comps = cand.compressions(problem)
        if problem.teacher is not None and not comps:
            raise Infeasible("no teacher-output compression is left after kd.allowed_compressions, "
                             f"--min-topk {problem.job.kd.min_topk}, --min-fidelity {problem.job.kd.min_fidelity} "
                             "(formats without a measurement are not eligible) and the kd.compression pin",
                             binding="fidelity floor", suggestion="lower --min-topk or allow dense")
        arrs = cand.arrangements(problem)
        if not arrs:
            pins = {k: v for k, v in problem.pins.items() if k.startswith("kd.") or k.endswith(".gpu")}
            hint = ("; on a mixed cluster co-located roles share one group, disaggregated roles use two "
                    "different groups and offline KD runs the teacher on every group"
                    if any(k.endswith(".gpu") for k in pins) else "")
            raise Infeasible(f"no placement satisfies --fix {pins}{hint}", binding="pin")
        _check_role_pins(problem, space, arrs)
        blocks = space.blocks(arrs, comps, tie_tolerance=TIE_TOLERANCE)
        if not blocks:
            try:
                diagnose(problem, space, arrs, comps, pricer)
            except Infeasible as e:
                if not problem.job.solver.runnable:
                    raise
                raise Infeasible(f"{e} (--runnable: only layouts `kdplan run` executes were considered; optimizer"
                                 " offload, hybrid sharding and the rest of kdplan.schema.capability.FEATURES were"
                                 " left out)", binding=e.binding, suggestion=e.suggestion) from None
        return PricedSpace(space, arrs, comps, blocks)

    def _solve_sequence(self, problem: Problem, top_k: int) -> Plan:
        """Sequence-level KD (kdplan.search.sequence): the student's plain cross-entropy step,
        planned as every plan is, then the teacher's generation layout chosen apart."""
        plan = self._solve(self._share(sequence.student_problem(problem)), top_k)
        return sequence.attach(problem, plan, *sequence.choose_generation(problem))

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
            note = cand.fidelity_note(problem, comp)
            plan.kd.compression_reason = "; ".join(x for x in (sol.compression_reason, note) if x) or None
            plan.kd.teacher_precision_reason = sol.teacher_precision_reason
        return plan


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
    if problem.teacher is not None and (ts := [a for a in arrs if a.mode != "train" and not space.teacher_apart(a)]):
        counts["teacher"] = sum(len(space.teacher_options(a, False)) for a in ts)
    if problem.job.solver.runnable and (none := [r for r, n in counts.items() if n == 0]):
        pins = ", ".join(f"{k}={v}" for k, v in problem.pins.items() if k.startswith(none[0] + "."))
        raise Infeasible(f"--runnable: no {none[0]} layout that `kdplan run` executes"
                         + (f" satisfies --fix {pins}" if pins else " exists on these GPUs")
                         + " (the executor's limits: kdplan.schema.capability.FEATURES)",
                         binding="executor capability", suggestion="drop --runnable to see what the planner would choose")
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
                hidden_state_dim=job.kd.hidden_state_dim,
                vocab_size=problem.kd_vocab_size if problem.teacher is not None else None)
    g0 = cl.groups[0].node
    summary = JobSummary(cluster=cl.name, gpus=world, gpus_per_node=g0.gpus_per_node,
                         gpu_types=[g.node.gpu for g in cl.groups], device_kind=cl.gpu_of_group(0).kind,
                         seq_len=job.seq_len, global_batch=job.global_batch, precision=job.precision,
                         tokens=job.tokens, dataset_tokens=job.dataset_tokens)
    return Plan(kdplan_version=__version__, created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                job=summary, teacher=teacher, student=RolePlan(source=job.student, model=problem.student, layout=student),
                kd=kd, prediction=pred, solver=solver, alternatives=alts, run=job.run, world_size=world)


_PLANNER = Planner()


def make_plan(problem: Problem, *, top_k: int | None = None, pricer: Pricer | None = None) -> Plan:
    """Choose the best plan for ``problem`` (cached on its resolved inputs)."""
    if pricer is not None:
        return Planner(pricer).plan(problem, top_k=top_k)
    return _PLANNER.plan(problem, top_k=top_k)
