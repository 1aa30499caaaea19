"""The baselines every speedup is measured against (design.md section 4), from the same cost
model, cached per problem (the solver asks once per plan):

- single_gpu: teacher and student on one GPU; the teacher's weights stream from host memory
  when they do not fit beside the student; the fastest micro-batch / recomputation that fits.
- naive_dp: every GPU holds a full teacher and a full student (tp = pp = 1), DDP with
  full-precision gradients, dense teacher logits; the fastest micro-batch / recomputation that fits.
- mirror: the teacher co-located on the student's GPUs with the student's own tp/pp/dp and
  micro-batch (ModelOpt-style); the fastest such pair that fits over tp, pp, micro-batch,
  recomputation and ZeRO-1.

A baseline that cannot run has step_time_s None and the reason (e.g. the teacher alone needs
more memory than one GPU holds). The layouts priced travel in the plan (BaselinePrediction.student
/ .teacher): `kdplan run --baseline` runs exactly them.
"""

from __future__ import annotations

import dataclasses

from ..problem import Problem
from ..schema.compression import Compression
from ..schema.plan import BaselinePrediction, Baselines, Layout
from .api import Candidate
from .compose import _lay, _micro_batches, _pow2_upto, colocated_memory, compose, predict, price_teacher

DENSE = Compression("dense")
RECOMPUTE = ("none", "selective", "full")


def _fits(problem: Problem, cand: Candidate) -> tuple[float, float, str] | None:
    """(step, memory, why) of a candidate; step is None-like (inf) when it does not fit."""
    step, s, t, _ = compose(problem, cand)
    if not s.fits:
        return float("inf"), s.memory_gib, s.why
    if t is None:
        return step, s.memory_gib, ""
    if not t.fits:
        return float("inf"), t.memory_gib, t.why
    mem, _, _ = colocated_memory(s, t)
    limit = problem.cluster.gpu_of_group(0).memory_gib
    if mem > limit:
        return float("inf"), mem, (f"teacher and student together need {mem:.1f} GiB per GPU "
                                   f"> {limit:g} GiB")
    return step, mem, ""


def _best(problem: Problem, cands) -> tuple[Candidate | None, str]:
    best, best_step, why, least = None, float("inf"), "", float("inf")
    for c in cands:
        if problem.job.student_precision != "job":  # the baselines train the student as the plan does
            c = dataclasses.replace(c, student=c.student.model_copy(
                update={"train_precision": problem.job.student_precision}))
        step, mem, w = _fits(problem, c)
        if step < best_step:
            best, best_step = c, step
        elif best is None and w and mem < least:
            least, why = mem, w
    return best, why


def _prediction(problem: Problem, cand: Candidate | None, why: str, description: str) -> BaselinePrediction:
    if cand is None:
        return BaselinePrediction(reason=why or "no layout fits", description=description)
    p = predict(problem, cand)
    st = cand.student
    desc = (f"{description}: tp={st.tp} pp={st.pp} dp={st.dp} micro_batch={st.micro_batch} "
            f"recompute={st.recompute} zero={st.zero}"
            + (" teacher offload=weights" if cand.teacher is not None and cand.teacher.offload == "weights" else ""))
    return BaselinePrediction(step_time_s=p.step_time_s, comm_bytes_per_step=p.comm_bytes_per_step,
                              utilization=p.utilization, memory_per_gpu_gib=p.memory_per_gpu_gib,
                              description=desc, student=st, teacher=cand.teacher)


def single_gpu(problem: Problem) -> BaselinePrediction:
    B = problem.job.global_batch
    has_t = problem.teacher is not None

    def cands():
        for b in _micro_batches(B):
            for rc in RECOMPUTE:
                for off in (("none", "weights") if has_t else ("none",)):
                    yield Candidate(student=_lay(1, 1, 1, b, rc), compression=DENSE,
                                    teacher=_lay(1, 1, 1, b, offload=off) if has_t else None)
    c, why = _best(problem, cands())
    return _prediction(problem, c, why, "teacher and student on one GPU" if has_t else "the student on one GPU")


def naive_dp(problem: Problem) -> BaselinePrediction:
    B, n = problem.job.global_batch, problem.cluster.num_gpus
    dp = max(d for d in range(1, n + 1) if B % d == 0 and d <= n)
    has_t = problem.teacher is not None

    def cands():
        for b in _micro_batches(B // dp):
            for rc in RECOMPUTE:
                yield Candidate(student=_lay(1, 1, dp, b, rc), compression=DENSE,
                                teacher=_lay(1, 1, dp, b) if has_t else None)
    c, why = _best(problem, cands())
    if c is None and has_t:
        t = price_teacher(problem, _lay(1, 1, dp, 1), compression=DENSE)
        if not t.fits:
            why = f"a full teacher replica does not fit one GPU ({t.why})"
    who = "full teacher and student replicas" if has_t else "full student replicas"
    return _prediction(problem, c, why, f"{who} on {dp} GPUs, DDP")


def mirror(problem: Problem) -> BaselinePrediction:
    B, n = problem.job.global_batch, problem.cluster.num_gpus
    gpn = problem.cluster.groups[0].node.gpus_per_node
    s_m, t_m = problem.student, problem.teacher
    layers = min(s_m.num_layers, t_m.num_layers) if t_m else s_m.num_layers

    def cands():
        for tp in _pow2_upto(min(gpn, n)):
            if s_m.num_heads % tp or (t_m and t_m.num_heads % tp):
                continue
            for pp in range(1, min(layers, n // tp) + 1):
                if (n // tp) % pp:
                    continue
                dp = n // (tp * pp)
                if B % dp:
                    continue
                for b in _micro_batches(B // dp):
                    for rc in RECOMPUTE:
                        for zero in (0, 1):
                            yield Candidate(student=_lay(tp, pp, dp, b, rc, zero), compression=DENSE,
                                            teacher=_lay(tp, pp, dp, b) if t_m else None)
    c, why = _best(problem, cands())
    what = "teacher mirrored on the student's layout" if t_m else "the student's best tp/pp layout (no teacher)"
    return _prediction(problem, c, why, what)


def baselines(problem: Problem) -> Baselines:
    """single_gpu, naive_dp and mirror for this problem (cached in the problem's cache)."""
    memo = problem.memo()
    if memo.baselines is None:
        memo.baselines = Baselines(single_gpu=single_gpu(problem), naive_dp=naive_dp(problem), mirror=mirror(problem))
    return memo.baselines
