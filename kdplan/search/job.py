"""Choose how to run the whole distillation job: several students, epochs, a teacher cache.

Strategies (each priced by kdplan.cost.job from step plans the single-step planner makes):

- ``separate_online``: every student its own best step plan, one after another, the teacher
  recomputed for every student and every epoch (what kdplan does for one student);
- ``online_fanout``: the teacher runs once per batch on all GPUs and feeds every student in turn
  on the same GPUs (one teacher forward per step for all students); memory: the teacher's and
  every student's fullest GPU must fit together (a conservative sum of the roles' peaks). The
  first student is planned as one run trains several (kdplan.schema.capability.one_run_pins: no
  pipeline stages, the teacher co-located; re-planned when its best step plan is not), every
  other student on its tp / pp / dp (the executor trains them on one mesh), the whole checked by
  the executor's own rule (capability.one_run_unsupported), and the plan then carries students
  2..n in ``extra_students`` (fanout_students);
- ``offline``: one teacher pass over the unique tokens writes a cache to a storage tier (the
  most faithful allowed format that fits it: kd.allowed_compressions, --min-topk and a
  kd.compression pin restrict it as for a step plan), then every student and epoch reads it:
  one after another (one run: each student its own step plan, all its steps in turn, reading the
  cache; the plan carries students 2..n in ``extra_students``, offline_students), or in turn in one run
  (_offline_in_turn: the first student as one run trains it, students 2..n on its tp / pp / dp,
  as for online_fanout; each batch's cached targets read once per step for all of them, as
  executor.train.CoStudent does; the plan then carries students 2..n in ``extra_students``,
  offline_students); on a tie, in turn;
- ``online_then_cache`` (the mix): one student's first epoch runs the teacher online, co-located,
  and writes its outputs to the cache as it trains (no separate teacher pass; the write streams
  behind the online step, which it binds only when slower); its later epochs and the other
  students read the cache (_online_then_cache). It wins when the storage is slow (a write-bound
  teacher pass, exposed reads: one epoch fewer reads) and ties with ``offline`` otherwise (the
  co-located step at the cache's format costs the pass's forward plus the student's step); ties go
  to the strategy listed first, so offline. The executor runs it (executor.teacher.Targets writes
  the cache during the online epoch).

Under ``kdplan plan --runnable`` the job is chosen among the strategies the executor runs
(_runnable: capability.job_strategy_unsupported, and several students only in one run, in
turn); the others are listed in ``rejected`` with the executor's reason.

The objective is the job's total time; every strategy keeps all the job's GPUs busy for the
whole job, so dollars rank the strategies the same way. The baseline is separate mirror KD
(design.md section 4). A strategy that cannot run says what binds in ``rejected``.

- ``offline`` with the students side by side: the same cache on the shared file system, each
  student on its own whole-node group (every split of the nodes, or one proportional split).
- ``disaggregated_fanout`` (several students): the teacher on its own group of GPUs runs once
  per batch and streams its outputs, in the step plan's teacher-output format, to every student,
  the students side by side on disjoint groups (every split of the nodes, or of one node's GPUs,
  into a teacher group and one group per student; or one split proportional to their work).
  Priced by kdplan.cost.job.disaggregated_fanout: the slowest of the teacher's forward on its
  group (kdplan.cost.compose.fastest_teacher_forward_s), each student's step on its group and
  the outputs' transfer between the groups (fanout_transfer_s). The teacher is recomputed every
  epoch (teacher_passes = epochs).

prediction.job.students_arrangement says how the students share the GPUs (one after another,
side by side, in turn within each step) and arrangement_reason why (the best job of the other
arrangement). A job no strategy can run says what binds (storage capacity, memory, fidelity
floor, pin) in the Infeasible's message and ``binding``.
"""

from __future__ import annotations

import itertools
import math

from ..cost import comm
from ..cost import job as jc
from ..cost.compose import fastest_teacher_forward_s, offline_read_s
from ..errors import Infeasible
from ..problem import Problem
from ..profiles import scale_cluster
from ..schema import capability
from ..schema.plan import (JobBaseline, JobBaselines, JobPhase, JobPrediction, Plan, RolePlan, StudentJob)
from .candidates import compressions, fidelity_key
from .choose import TIE_TOLERANCE

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def wants_job(problem: Problem) -> bool:
    """A whole-job plan needs a teacher and a token budget."""
    return problem.teacher is not None and problem.job.tokens is not None


def _sub(problem: Problem, index: int, pins: dict | None = None, cluster=None, *, apart: bool = False) -> Problem:
    """The step problem of student ``index`` (no whole-job fields, so no recursion). The first
    student keeps the ids the job's KD compares over (``kd_vocab_size``, from jobs.resolve); the
    others default to their own table (resolve checks only the first student's against the teacher).
    ``apart``: the student on a group of the job's GPUs whose teacher is planned once for the job,
    elsewhere (Problem.teacher_pass_apart: the step plan lays out no teacher)."""
    names = problem.job.students or [problem.job.student]
    specs = problem.students or (problem.student,)
    job = problem.job.model_copy(update={"tokens": None, "students": None, "dataset_tokens": None,
                                         "student": names[index]})
    return Problem(job=job, teacher=problem.teacher, student=specs[index], cluster=cluster or problem.cluster,
                   pins=dict(problem.pins) | (pins or {}), job_path=problem.job_path,
                   teacher_precisions=problem.teacher_precisions, kd_signal=problem.kd_signal,
                   kd_signal_reason=problem.kd_signal_reason,
                   kd_vocab_size=problem.kd_vocab_size if index == 0 else None, teacher_pass_apart=apart)


def plan_job(plan_fn, problem: Problem, plan: Plan) -> tuple[JobPrediction, Problem | None]:
    """The whole-job prediction for ``problem`` whose step plan (of its first student) is
    ``plan``, and the step problem of the first student under the chosen strategy when it is
    not ``problem`` itself (offline: kd.mode and kd.compression pinned to the cache's format,
    reads priced at the cache tier's bandwidth; students side by side: the same on all the
    GPUs), so that the plan's kd block runs what the job chose (the planner adopts it).
    ``plan_fn(problem) -> Plan`` makes a step plan (the planner, with its caches)."""
    job = problem.job
    names = list(job.students or [job.student])
    specs = list(problem.students or (problem.student,))
    tokens = float(job.tokens)
    dataset = float(job.dataset_tokens or tokens)
    tps = job.global_batch * job.seq_len
    steps = tokens / tps
    epochs = tokens / dataset
    unique = min(dataset, tokens)
    gpus = problem.num_gpus
    n = len(names)
    rejected: list[str] = []
    binds: set[str] = set()  # what made strategies fail (capacity, memory, fidelity floor, pin, ...)
    mode_pin = problem.pins.get("kd.mode")
    if problem.kd_signal == "sequence":
        return _sequence_job(plan_fn, problem, plan, names, unique, steps, tps, epochs, dataset, tokens), None

    online = [plan] + [_try(plan_fn, _sub(problem, i), rejected, f"{names[i]} online", binds) for i in range(1, n)]
    mirror = [p.prediction.baselines.mirror.step_time_s if p else None for p in online]
    strategies: list[jc.JobPrice] = []
    step_problem: dict[int, Problem] = {}  # id(strategy) -> its first student's step problem
    if mode_pin != "offline" and all(online):
        strategies.append(jc.separate(names, [p.prediction.step_time_s for p in online], steps, gpus,
                                      "separate_online", n * epochs))

    # Offline step plans per storage tier: the student reading the cache, the teacher pass per step.
    offline_plans: dict[str, tuple[jc.Storage, object, list[Plan], Problem]] = {}
    tiers = jc.storage_tiers(problem.cluster)
    if not tiers:
        binds.add("capacity")
        rejected.append(f"offline: the cluster profile {problem.cluster.name} lists no storage "
                        "(local_storage / shared_storage) to hold a cache")
    vocab, q = problem.kd_vocab_size, PRECISION_BYTES[job.precision]
    formats = sorted(compressions(problem), key=fidelity_key, reverse=True)
    if mode_pin != "online":
        for tier in tiers:
            fmt = next((f for f in formats if jc.fits(tier, jc.cache_bytes(unique, f, vocab, q), f, unique) is None), None)
            if fmt is None:
                last = min(formats, key=lambda f: f.bytes_per_token(vocab, q)) if formats else None
                binds.add("capacity" if last else "fidelity floor")
                rejected.append(f"offline on {tier.name}: "
                                + (jc.fits(tier, jc.cache_bytes(unique, last, vocab, q), last, unique)
                                   + " (the smallest allowed format)" if last else "no allowed format"))
                continue
            cl = _with_read(problem.cluster, tier)
            probs = [_sub(problem, i, {"kd.mode": "offline", "kd.compression": fmt}, cl) for i in range(n)]
            subs = [_try(plan_fn, probs[i], rejected, f"offline {names[i]} reading {fmt} from {tier.name}", binds)
                    for i in range(n)]
            if all(subs) and subs[0].prediction.offline is not None:
                offline_plans[tier.name] = (tier, fmt, subs, probs[0])
                t_step = subs[0].prediction.offline.teacher_pass_s_per_step
                # in turn in one run first: on a tie it is the one `kdplan run` executes
                if n > 1 and (turn := _offline_in_turn(plan_fn, problem, tier, fmt, subs[0], unique, steps, rejected)):
                    strategies.append(turn[0])
                    step_problem[id(turn[0])] = turn[1]
                strategies.append(jc.offline(names, t_step, [p.prediction.step_time_s for p in subs], unique, steps,
                                             tps, fmt, fmt.bytes_per_token(vocab, q), tier, gpus))
                step_problem[id(strategies[-1])] = probs[0]

    # The mix: a student's first epoch online writes the cache, later epochs and other students read it.
    if offline_plans and mode_pin is None and problem.pins.get("kd.placement") != "disaggregated":
        if n == 1 and epochs <= 1:
            pass  # nothing would read the cache: it is the online step plus the write
        elif problem.job.solver.runnable and (why := capability.job_strategy_unsupported("online_then_cache")):
            rejected.append(f"online_then_cache: {why}")
        else:
            for tier, fmt, subs, _ in offline_plans.values():
                mix = _online_then_cache(plan_fn, problem, tier, fmt, subs, online, unique, steps, rejected, binds)
                if mix is not None:
                    strategies.append(mix[0])
                    step_problem[id(mix[0])] = mix[1]

    # Students side by side on disjoint node groups, reading a cache on the shared file system
    # (a node-local cache is sharded over all the nodes: every node must read its own shard).
    shared = next((v for k, v in offline_plans.items() if problem.cluster.shared_storage is not None
                   and k == problem.cluster.shared_storage.name), None)
    if n > 1 and shared is not None and len(problem.cluster.groups) == 1:
        tier, fmt, subs, whole = shared
        t_step = subs[0].prediction.offline.teacher_pass_s_per_step
        side_rejected, any_split = [], False
        for split in _splits(problem, [p.prediction.step_time_s for p in subs]):
            # the teacher pass is the job's, on all its GPUs (t_step): the groups lay out students only
            parts = [_try(plan_fn, _sub(problem, i, {"kd.mode": "offline", "kd.compression": fmt},
                                        _with_read(scale_cluster(problem.cluster, g), tier), apart=True),
                          side_rejected, f"offline {names[i]} on {g} GPUs side by side", binds)
                     for i, g in enumerate(split)]
            if all(parts):
                any_split = True
                strategies.append(jc.offline(names, t_step, [p.prediction.step_time_s for p in parts], unique, steps,
                                             tps, fmt, fmt.bytes_per_token(vocab, q), tier, gpus, student_gpus=split))
                step_problem[id(strategies[-1])] = whole
        if not any_split:  # splits that do not fit are noise once one does
            rejected += side_rejected

    # Online fan-out: the teacher's forward once per step + each student's step without the read.
    fan = _fanout(plan_fn, problem, plan, rejected) if n > 1 and mode_pin != "offline" else None
    subs = fan[2] if fan is not None else None
    if subs is not None:
        t_step = subs[0].prediction.offline.teacher_pass_s_per_step
        s_steps = [p.prediction.step_time_s - p.prediction.breakdown_s.get("comm_teacher_outputs", 0.0) for p in subs]
        mem = (fan[0].prediction.memory_per_role_gib.get("teacher", 0.0)
               + sum(p.prediction.memory_per_role_gib.get("student", p.prediction.memory_per_gpu_gib) for p in subs))
        limit = min(problem.cluster.gpus[g.node.gpu].memory_gib for g in problem.cluster.groups)
        if mem > limit:
            binds.add("memory")
            rejected.append(f"online_fanout: the teacher and {n} students on the same GPUs need up to "
                            f"{mem:.1f} GiB per GPU (sum of each role's fullest GPU); a GPU has {limit:.0f} GiB")
        else:
            strategies.append(jc.online_fanout(names, t_step, s_steps, steps, gpus, epochs))
            if fan[1] is not None:  # the first student re-planned for one run (capability.one_run_pins)
                step_problem[id(strategies[-1])] = fan[1]

    # The teacher on its own GPUs fanning out online to the students side by side.
    if n > 1 and mode_pin != "offline":
        weights = ([subs[0].prediction.offline.teacher_pass_s_per_step, *s_steps] if subs is not None else None)
        strategies += _disaggregated(plan_fn, problem, plan, names, steps, epochs, weights, rejected, binds)

    if problem.job.solver.runnable:
        strategies = _runnable(strategies, n, rejected, binds)
    if not strategies:
        what = ", ".join(sorted(binds)) or "job"
        raise Infeasible(f"no whole-job strategy can run (what binds: {what}): " + "; ".join(rejected), binding=what)
    # the shortest; whole jobs within the step plans' tie tolerance (kdplan.search.choose: among
    # layouts within 1% each step plan keeps the one that moves fewest bytes, so two strategies'
    # step plans may differ by that much for no physical reason) are a tie, and the strategy
    # listed first wins (the simpler one: a mix that only matches a teacher pass plus a read epoch
    # is not chosen over them)
    shortest = min(s.total_time_s for s in strategies)
    best = next(s for s in strategies if s.total_time_s <= shortest * (1 + TIE_TOLERANCE))
    arrangement, arrangement_reason = _arrangement(best, strategies, n, gpus)

    base = JobBaseline(reason="a student's mirror-KD baseline cannot run") if None in mirror else \
        JobBaseline(total_time_s=sum(m * steps for m in mirror))
    usd_per_s = _usd_per_s(problem)
    others = ", ".join(f"{_label(s)} {s.total_time_s / 3600:.4g} h" for s in strategies if s is not best)
    reason = (f"{_label(best)}: {best.total_time_s / 3600:.4g} h, the shortest whole job"
              + (f" (vs {others})" if others else ""))
    job_pred = JobPrediction(
        strategy=best.strategy, reason=reason, total_time_s=best.total_time_s,
        students_arrangement=arrangement, arrangement_reason=arrangement_reason, teacher_gpus=best.teacher_gpus,
        cost_usd=best.total_time_s * usd_per_s if usd_per_s is not None else None,
        cache_bytes=best.cache_bytes, cache_format=best.cache_format, cache_storage=best.cache_storage,
        teacher_passes=best.teacher_passes, dataset_tokens=dataset, tokens_per_student=tokens, epochs=epochs,
        students=[StudentJob(student=nm, step_time_s=s, steps=steps, mirror_step_time_s=m,
                             gpus=best.student_gpus[i] if best.student_gpus else gpus)
                  for i, (nm, s, m) in enumerate(zip(names, best.student_steps_s, mirror))],
        timeline=[JobPhase(name=p.name, start_s=start, duration_s=p.duration_s, gpus=p.gpus, detail=p.detail)
                  for p, start in best.timeline()],
        rejected=rejected, baselines=JobBaselines(separate_mirror=base),
        speedup_vs_separate_mirror=(base.total_time_s / best.total_time_s
                                    if base.total_time_s and best.total_time_s > 0 else None))
    return job_pred, step_problem.get(id(best))


def _offline_in_turn(plan_fn, problem: Problem, tier: jc.Storage, fmt, first: Plan, unique: float, steps: float,
                     rejected: list[str]) -> tuple[jc.JobPrice, Problem] | None:
    """``offline`` with every student in one run on all the GPUs, as `kdplan run` trains them
    (executor.train.CoStudent: one mesh, each batch's cached targets read once per step for all),
    and the first student's step problem: _in_turn_subs (``first``: its offline step plan reading
    ``fmt`` from ``tier``, re-planned when one run needs another layout); None, with the reason in
    ``rejected``, when one cannot or they do not fit on a GPU together (the sum of each student's
    fullest GPU, as online_fanout counts it)."""
    got = _in_turn_subs(plan_fn, problem, tier, fmt, first, rejected)
    if got is None:
        return None
    subs, prob = got
    first = subs[0]
    mem = sum(p.prediction.memory_per_role_gib.get("student", p.prediction.memory_per_gpu_gib) for p in subs)
    limit = min(problem.cluster.gpus[g.node.gpu].memory_gib for g in problem.cluster.groups)
    if mem > limit:
        rejected.append(f"offline in turn on {tier.name}: the {len(subs)} students in one run need up to {mem:.1f} GiB"
                        f" per GPU (sum of each student's fullest GPU); a GPU has {limit:.0f} GiB")
        return None
    job = problem.job
    tps = job.global_batch * job.seq_len
    read = [p.prediction.breakdown_s.get("comm_teacher_outputs", 0.0) for p in subs]
    shares = [p.prediction.step_time_s - x for p, x in zip(subs, read)]
    compute = [sum(p.prediction.breakdown_s.get(k, 0.0) for k in ("compute", "loss", "framework")) for p in subs]
    read_s = offline_read_s(_sub(problem, 0, cluster=_with_read(problem.cluster, tier)), first.student.layout,
                            first.prediction.bytes_per_step.get("teacher_outputs", 0.0))
    names = [str(x) for x in (problem.job.students or [problem.job.student])]
    q = PRECISION_BYTES[job.precision]
    return jc.offline_in_turn(names, first.prediction.offline.teacher_pass_s_per_step, shares, read_s, compute,
                              unique, steps, tps, fmt, fmt.bytes_per_token(problem.kd_vocab_size, q), tier,
                              problem.num_gpus), prob


def _in_turn_subs(plan_fn, problem: Problem, tier: jc.Storage, fmt, first: Plan,
                  rejected: list[str] | None = None) -> tuple[list[Plan], Problem] | None:
    """The step plans of offline in turn, each reading ``fmt`` from ``tier``, and the first
    student's step problem: the first student as one run trains it (_one_run_first: ``first``
    itself when it already does), students 2..n on its tp / pp / dp (capability.one_run_pins),
    checked together by _one_run_check."""
    rejected = rejected if rejected is not None else []
    names = problem.job.students or [problem.job.student]
    cl = _with_read(problem.cluster, tier)
    pins, what = {"kd.mode": "offline", "kd.compression": fmt}, f"offline in turn on {tier.name}"
    got = _one_run_first(plan_fn, problem, first, _sub(problem, 0, pins, cl), pins, cl, rejected, what)
    if got is None:
        return None
    first, prob = got
    subs = [first] + [_try(plan_fn, _sub(problem, i, pins | capability.one_run_pins(first.student.layout), cl),
                           rejected, f"{what}: {names[i]} on the first student's tp/pp/dp")
                      for i in range(1, len(names))]
    if not all(subs) or not _one_run_check(problem, first, subs, rejected, what):
        return None
    return subs, prob


def _one_run_first(plan_fn, problem: Problem, first: Plan, first_problem: Problem, pins: dict, cluster,
                   rejected: list[str], what: str) -> tuple[Plan, Problem] | None:
    """The first student's step plan in a run that trains every student in turn, and its step
    problem: ``first`` (planned from ``first_problem``) when it meets capability.one_run_pins (no
    pipeline stages, the teacher co-located), else re-planned with them on top of ``pins`` (the
    job's, e.g. offline at the cache's format) on ``cluster``; None, with the reason in
    ``rejected``, when it cannot be."""
    need = capability.one_run_pins()
    if all(_pinned_value(first, k) == v for k, v in need.items()):
        return first, first_problem
    names = problem.job.students or [problem.job.student]
    if clash := [f"{k}={problem.pins[k]}" for k, v in need.items() if k in problem.pins and problem.pins[k] != v]:
        rejected.append(f"{what}: --fix {', '.join(clash)}, and one run trains several students only with "
                        + ", ".join(f"{k}={v}" for k, v in need.items()) + " (kdplan.schema.capability.one_run_pins)")
        return None
    prob = _sub(problem, 0, pins | need, cluster)
    plan = _try(plan_fn, prob, rejected, f"{what}: {names[0]} as one run trains it ("
                + ", ".join(f"{k}={v}" for k, v in need.items()) + ")")
    return (plan, prob) if plan is not None else None


def _one_run_check(problem: Problem, first: Plan, subs: list[Plan], rejected: list[str], what: str) -> bool:
    """Whether the executor runs ``first`` carrying students 2..n with ``subs[1:]``'s layouts, by
    its own rule (capability.one_run_unsupported); if not, the reason goes to ``rejected``: the
    search never offers a one-run arrangement `kdplan run` refuses."""
    trial = first.model_copy(update={"extra_students": _extra_students(problem, subs)})
    if u := capability.one_run_unsupported(trial):
        rejected.append(f"{what}: {u}")
        return False
    return True


def _pinned_value(plan: Plan, key: str):
    """The value a plan has for a --fix key (``role.field`` of a layout, ``kd.field``)."""
    head, field = key.split(".", 1)
    return getattr(plan.kd, field) if head == "kd" else getattr(getattr(plan, head).layout, field)


def _extra_students(problem: Problem, subs: list[Plan]) -> list[RolePlan]:
    """plan.extra_students of one run: students 2..n with their step plans' layouts."""
    names = problem.job.students or [problem.job.student]
    specs = problem.students or (problem.student,)
    return [RolePlan(source=str(names[i]), model=specs[i], layout=p.student.layout) for i, p in enumerate(subs)
            if i > 0]


def _runnable(strategies: list[jc.JobPrice], n: int, rejected: list[str], binds: set[str]) -> list[jc.JobPrice]:
    """`kdplan plan --runnable`: the strategies the executor runs (capability.job_strategy_unsupported,
    job_students_unsupported: several students only in one run, in turn); the others go to
    ``rejected`` with the reason, so the search chooses among what `kdplan run` executes."""
    keep = []
    for s in strategies:
        u = (capability.job_strategy_unsupported(s.strategy)
             or capability.job_students_unsupported(s.strategy, arrangement_of(s), n, teacher_gpus=s.teacher_gpus))
        if u is None:
            keep.append(s)
        else:
            binds.add("executor capability")
            rejected.append(f"{_label(s)}: --runnable, and `kdplan run` does not run {capability.FEATURES[u.feature]}")
    return keep


def _online_then_cache(plan_fn, problem: Problem, tier: jc.Storage, fmt, subs: list[Plan], online: list,
                       unique: float, steps: float, rejected: list[str], binds: set[str]):
    """The mix on ``tier`` (kdplan.cost.job.online_then_cache) and its first student's step problem.
    The writer is the student whose online epoch saves most against a teacher pass plus a read
    epoch (estimated from its own online step plan; None where it has none); its first epoch is
    its online, co-located step plan with the teacher's outputs in the cache's format ``fmt``
    (they are written as they are produced), planned on the job's cluster (nothing is read)."""
    names = [str(x) for x in (problem.job.students or [problem.job.student])]
    t_step = subs[0].prediction.offline.teacher_pass_s_per_step
    gain = [t_step + s.prediction.step_time_s - o.prediction.step_time_s if o else -math.inf
            for s, o in zip(subs, online)]
    w = max(range(len(names)), key=gain.__getitem__)
    if gain[w] == -math.inf:
        return None
    prob = _sub(problem, w, {"kd.mode": "online", "kd.placement": "colocated", "kd.compression": fmt})
    first = _try(plan_fn, prob, rejected, f"online_then_cache: {names[w]}'s first epoch online at {fmt}", binds)
    if first is None:
        return None
    job = problem.job
    q = PRECISION_BYTES[job.precision]
    price = jc.online_then_cache(names, w, first.prediction.step_time_s, [p.prediction.step_time_s for p in subs],
                                 unique, steps, job.global_batch * job.seq_len, fmt,
                                 fmt.bytes_per_token(problem.kd_vocab_size, q), tier, problem.num_gpus)
    return price, (prob if w == 0 else _sub(problem, 0, {"kd.mode": "offline", "kd.compression": fmt},
                                            _with_read(problem.cluster, tier)))


def _fanout(plan_fn, problem: Problem, plan: Plan, rejected: list[str] | None = None
            ) -> tuple[Plan, Problem | None, list[Plan]] | None:
    """online_fanout's first student's online step plan (``plan``, or re-planned as one run trains
    it: _one_run_first), its step problem when re-planned (else None: ``problem`` itself), and the
    step plans it is priced from, one per student (fanout_subs), checked together by
    _one_run_check. None where it cannot run."""
    rejected = rejected if rejected is not None else []
    got = _one_run_first(plan_fn, problem, plan, problem, {}, problem.cluster, rejected, "online_fanout")
    if got is None:
        return None
    first, prob = got
    subs = fanout_subs(plan_fn, problem, first, rejected)
    if subs is None or not _one_run_check(problem, first, subs, rejected, "online_fanout"):
        return None
    return first, (prob if first is not plan else None), subs


def fanout_subs(plan_fn, problem: Problem, plan: Plan, rejected: list[str] | None = None) -> list[Plan] | None:
    """The step plans online_fanout is priced from, one per student (None where one cannot run):
    each student on the first student's tp / pp / dp (``plan``: its online step plan as one run
    trains it, capability.one_run_pins), planned offline with the plan's teacher-output format so
    that the teacher's forward per step (prediction.offline.teacher_pass_s_per_step) and the
    student's step come apart; the offline read (comm_teacher_outputs) is taken out by the caller.
    No storage tier is needed: nothing is stored. The same problems each time: the planner's cache
    makes a second call free."""
    names = problem.job.students or [problem.job.student]
    pins = {"kd.mode": "offline", "kd.compression": plan.kd.compression} | capability.one_run_pins(plan.student.layout)
    subs = [_try(plan_fn, _sub(problem, i, pins), rejected if rejected is not None else [],
                 f"online_fanout: {names[i]} on the first student's tp/pp/dp") for i in range(len(names))]
    if not all(subs) or subs[0].prediction.offline is None:
        return None
    return subs


def fanout_students(plan_fn, problem: Problem, plan: Plan) -> list[RolePlan]:
    """The plan's extra_students when the job fans the teacher out online (``plan``: the first
    student's step plan the job adopted, as one run trains it): students 2..n with the layouts
    online_fanout was priced with (fanout_subs)."""
    return _extra_students(problem, fanout_subs(plan_fn, problem, plan) or [])


def offline_students(plan_fn, problem: Problem, job: JobPrediction, plan: Plan) -> list[RolePlan]:
    """The plan's extra_students when the job runs ``offline`` with its students in turn in one run
    (``plan``: the first student's offline step plan the job adopted): students 2..n with the layouts
    _offline_in_turn priced (on the first student's tp / pp / dp, each reading the cache in
    ``job.cache_format`` from ``job.cache_storage``); the executor trains them in one run from one
    read of each batch's cached targets (executor.train.CoStudent). Students one after another
    (capability.SEQUENTIAL_ARRANGEMENT): students 2..n with their own offline step plans, the ones
    the job was priced from (each on all the job's GPUs reading ``job.cache_format`` from
    ``job.cache_storage``: any layout, micro-batch, ZeRO); the executor trains them in one run
    after the teacher pass, each all its steps in turn (capability.students_one_after_another).
    Empty for every other arrangement: each student is then its own run (the executor's check
    says so)."""
    names = problem.job.students or [problem.job.student]
    if job.strategy != "offline" or len(names) < 2:
        return []
    tier = next((t for t in jc.storage_tiers(problem.cluster) if t.name == job.cache_storage), None)
    if tier is None:
        return []
    if job.students_arrangement == capability.SEQUENTIAL_ARRANGEMENT:
        cl, pins = _with_read(problem.cluster, tier), {"kd.mode": "offline", "kd.compression": job.cache_format}
        # the same step problems plan_job priced (the planner's cache makes them free)
        subs = [plan] + [_try(plan_fn, _sub(problem, i, pins, cl), [], f"offline {names[i]}")
                         for i in range(1, len(names))]
        return _extra_students(problem, subs) if all(subs) else []
    if job.students_arrangement != capability.ONE_RUN_ARRANGEMENT:
        return []
    got = _in_turn_subs(plan_fn, problem, tier, job.cache_format, plan)
    return _extra_students(problem, got[0]) if got is not None else []


def _sequence_job(plan_fn, problem: Problem, plan: Plan, names, unique, steps, tps, epochs, dataset,
                  tokens) -> JobPrediction:
    """Sequence-level KD's whole job (kdplan.cost.job.sequence_level): the teacher generates the
    corpus once, every student trains on it; the one strategy there is (logit KD, and so its
    separate-mirror baseline, cannot run across different tokenizers)."""
    rejected: list[str] = []
    subs = [plan] + [_try(plan_fn, _sub(problem, i), rejected, f"{names[i]} cross-entropy step")
                     for i in range(1, len(names))]
    if not all(subs):
        raise Infeasible("no whole-job strategy can run: " + "; ".join(rejected), binding="job")
    tiers = jc.storage_tiers(problem.cluster)
    best = jc.sequence_level(names, plan.prediction.generation.teacher_pass_s_per_step,
                             [p.prediction.step_time_s for p in subs], unique, steps, tps,
                             tiers[0] if tiers else None, problem.num_gpus)
    usd_per_s = _usd_per_s(problem)
    why = problem.kd_signal_reason or "sequence-level KD"
    return JobPrediction(
        strategy="sequence", total_time_s=best.total_time_s,
        reason=f"sequence-level KD ({why}): {best.total_time_s / 3600:.4g} h, the teacher's generation pass "
               "then every student's cross-entropy steps",
        cost_usd=best.total_time_s * usd_per_s if usd_per_s is not None else None,
        cache_bytes=best.cache_bytes, cache_storage=best.cache_storage, teacher_passes=best.teacher_passes,
        dataset_tokens=dataset, tokens_per_student=tokens, epochs=epochs,
        students=[StudentJob(student=nm, step_time_s=s, steps=steps, gpus=problem.num_gpus)
                  for nm, s in zip(names, best.student_steps_s)],
        timeline=[JobPhase(name=p.name, start_s=start, duration_s=p.duration_s, gpus=p.gpus, detail=p.detail)
                  for p, start in best.timeline()],
        rejected=rejected, baselines=JobBaselines(separate_mirror=JobBaseline(
            reason="mirror KD distils logits, which cannot be compared across different tokenizers")))


def _with_read(cluster, tier: jc.Storage):
    """The cluster whose offline reads come from ``tier`` at its per-node rate in the whole job
    (the cost model reads the first storage tier, cost.job.offline_read_gb_per_s): the other tier
    dropped; a shared tier keeps, on this cluster's nodes, the per-node share it has in the job."""
    shared = cluster.shared_storage
    if shared is not None and tier.name == shared.name:
        nodes = sum(g.num_nodes for g in cluster.groups)
        groups = [g.model_copy(update={"node": g.node.model_copy(update={"local_storage": None})})
                  for g in cluster.groups]
        return cluster.model_copy(update={"groups": groups, "shared_storage": shared.model_copy(
            update={"read_gb_per_s": tier.per_node_read_gb_per_s * nodes})})
    return cluster.model_copy(update={"shared_storage": None})


MAX_SPLITS = 12


def _parts(units: int, weights: list[float] | None, n: int) -> list[list[int]]:
    """Ways to cut ``units`` (nodes, or one node's GPUs) into ``n`` positive parts: every way when
    there are at most MAX_SPLITS, else the one proportional to ``weights`` (each part's time on
    all the units; None: equal parts)."""
    if units < n:
        return []
    if math.comb(units - 1, n - 1) <= MAX_SPLITS:  # counted first: hundreds of nodes have billions of cuts
        return [[b - a for a, b in zip((0, *c), (*c, units))] for c in itertools.combinations(range(1, units), n - 1)]
    w = weights if weights and sum(weights) > 0 else [1.0] * n
    share = [max(1, round(units * x / sum(w))) for x in w]
    while sum(share) > units:
        share[share.index(max(share))] -= 1
    share[share.index(max(share))] += units - sum(share)
    return [share] if min(share) >= 1 else []


def _splits(problem: Problem, steps_all_gpus: list[float]) -> list[list[int]]:
    """GPU counts of disjoint whole-node groups, one per student (_parts of the nodes)."""
    gpn = problem.cluster.groups[0].node.gpus_per_node
    return [[k * gpn for k in p] for p in _parts(problem.cluster.groups[0].num_nodes, steps_all_gpus,
                                                  len(steps_all_gpus))]


def _disaggregated(plan_fn, problem: Problem, plan: Plan, names: list[str], steps: float, epochs: float,
                   weights: list[float] | None, rejected: list[str], binds: set[str]) -> list[jc.JobPrice]:
    """disaggregated_fanout at every split (_parts) of the cluster into a teacher group and one
    group per student: whole nodes on a multi-node cluster (the outputs cross the inter-node
    links), GPUs of the one node otherwise (its intra-node links). The teacher-output format is
    the step plan's (plan.kd.compression); each student's step is its offline step plan on its
    group without the cache read (as fanout_subs). ``weights``: the teacher's forward and each
    student's step on all the GPUs, for the proportional split."""
    cl = problem.cluster
    if len(cl.groups) != 1:
        rejected.append("disaggregated_fanout: priced on one-group clusters only (this one mixes GPU types)")
        return []
    teacher_pins = sorted(k for k in problem.pins if k.startswith("teacher."))
    if teacher_pins or problem.pins.get("kd.placement") == "colocated":
        binds.add("pin")
        rejected.append("disaggregated_fanout: the pins " + ", ".join(teacher_pins or ["kd.placement=colocated"])
                        + " leave the teacher no group of its own to lay out")
        return []
    g0 = cl.groups[0]
    gpn, nodes = g0.node.gpus_per_node, g0.num_nodes
    unit, units = (gpn, nodes) if nodes > 1 else (1, gpn)
    link, where = (g0.node.inter_node, "the inter-node links") if nodes > 1 else (g0.node.intra_node, "the intra-node links")
    fmt = plan.kd.compression
    per_token = fmt.bytes_per_token(problem.kd_vocab_size, PRECISION_BYTES[problem.job.precision])
    tps = problem.job.global_batch * problem.job.seq_len
    lane = comm.op_bandwidth(link, "send_recv")
    splits = _parts(units, weights, len(names) + 1)
    if not splits:
        rejected.append(f"disaggregated_fanout: {units} {'nodes' if nodes > 1 else 'GPUs'} cannot hold a teacher "
                        f"group and {len(names)} student groups")
        return []
    out, why, teacher_s = [], [], {}
    for split in splits:
        gt, gs = split[0] * unit, [k * unit for k in split[1:]]
        if gt not in teacher_s:
            sub = _sub(problem, 0, cluster=scale_cluster(cl, gt))
            teacher_s[gt] = fastest_teacher_forward_s(sub, gt, fmt)
        if teacher_s[gt] == float("inf"):
            binds.add("memory")
            why.append(f"the teacher fits no layout on {gt} GPUs")
            continue
        # the teacher is priced on its own group (teacher_s): the student groups lay out students only
        parts = [_try(plan_fn, _sub(problem, i, {"kd.mode": "offline", "kd.compression": fmt}, scale_cluster(cl, g),
                                    apart=True), why, f"{names[i]} on {g} GPUs", binds) for i, g in enumerate(gs)]
        if not all(parts):
            continue
        s_steps = [p.prediction.step_time_s - p.prediction.breakdown_s.get("comm_teacher_outputs", 0.0) for p in parts]
        x = jc.fanout_transfer_s(tps, per_token, gt, gs, lane, link.latency_us * 1e-6)
        out.append(jc.disaggregated_fanout(names, gt, teacher_s[gt], s_steps, gs, x, steps, epochs,
                                           f"{where} at {fmt}"))
    if not out:
        rejected.append("disaggregated_fanout: " + "; ".join(dict.fromkeys(why)))
    return out


def _label(s: jc.JobPrice) -> str:
    """A strategy in the plan's reason: its name, cache, and the GPU split when side by side."""
    side = f"students side by side on {'+'.join(map(str, s.student_gpus))} GPUs" if s.student_gpus else \
        "students in turn in one run" if s.in_turn else ""
    if s.teacher_gpus:
        return f"{s.strategy} (teacher on {s.teacher_gpus} GPUs, {side})"
    if s.cache_storage:
        return f"{s.strategy} ({s.cache_format} on {s.cache_storage}{', ' + side if side else ''})"
    return s.strategy


ARRANGEMENT_WORDS = {"one_after_another": "one after another", "side_by_side": "side by side",
                     "in_turn_each_step": "in turn within each step on the same GPUs"}


def arrangement_of(s: jc.JobPrice) -> str:
    """How a strategy's students share the GPUs (JobPrediction.students_arrangement)."""
    if s.student_gpus:
        return "side_by_side"
    return "in_turn_each_step" if s.strategy == "online_fanout" or s.in_turn else "one_after_another"


def _arrangement(best: jc.JobPrice, strategies: list[jc.JobPrice], n: int, gpus: int) -> tuple[str, str]:
    """The chosen arrangement and why: the best job of each other arrangement, or that none ran."""
    mine = arrangement_of(best)
    mix = (f"; {best.writer}'s first epoch runs the teacher online and writes the cache"
           + (", which its later epochs and the other students read" if n > 1 else ", which its later epochs read")
           if best.writer else "")
    if n == 1:
        return mine, f"one student: it trains on all {gpus} GPUs{mix}"
    bits = []
    for other in ARRANGEMENT_WORDS:
        if other == mine:
            continue
        alt = [s for s in strategies if arrangement_of(s) == other]
        if alt:
            b = min(alt, key=lambda s: s.total_time_s)
            bits.append(f"{ARRANGEMENT_WORDS[other]} at best {b.total_time_s / 3600:.4g} h ({_label(b)})")
        else:
            bits.append(f"{ARRANGEMENT_WORDS[other]}: none could run (prediction.job.rejected)")
    where = (f" on {'+'.join(map(str, best.student_gpus))} GPUs" if best.student_gpus else f" on all {gpus} GPUs")
    return mine, (f"{ARRANGEMENT_WORDS[mine]}{where}: {best.total_time_s / 3600:.4g} h, the shortest{mix}; "
                  + "; ".join(bits))


def _kind(e: Infeasible) -> str:
    """What an Infeasible step plan says binds, in the job's words."""
    b = e.binding or ""
    if b in ("teacher", "student", "memory", "teacher memory") or "memory" in b:
        return "memory"
    return b or "other"


def _try(plan_fn, problem: Problem, rejected: list[str], what: str, binds: set[str] | None = None) -> Plan | None:
    try:
        return plan_fn(problem)
    except Infeasible as e:
        rejected.append(f"{what}: {e}")
        if binds is not None:
            binds.add(_kind(e))
        return None


def _usd_per_s(problem: Problem) -> float | None:
    per_hour = jc.cluster_price_per_hour(problem.cluster)
    return per_hour / 3600 if per_hour is not None else None
