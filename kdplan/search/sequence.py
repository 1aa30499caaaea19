"""Sequence-level KD plans (kd.signal = "sequence"): the student's cross-entropy step and the
teacher's generation layout, chosen apart.

The teacher generates the training text once, before the student trains, on all the job's GPUs
(kdplan.cost.generation prices it); the student then trains with plain cross-entropy on that
text. The two never share a step, so they are two choices:

- the student's step: the problem without its teacher (``student_problem``: plain training, the
  same enumerate -> price -> choose as every plan; teacher and kd pins dropped);
- the teacher's generation layout (``choose_generation``): every tp x pp x dp of all the GPUs
  (tp divides the query and KV heads and stays inside a node unless pinned; pp up to the layer
  count, uneven splits as kdplan.schema.layers.split_layers cuts them), the teacher.tp / .pp /
  .dp / .micro_batch pins honoured (micro_batch: sequences per pipeline micro-batch of the
  decode), bf16 weights resident; the fastest pass wins (ties: fewer GPUs per replica).

``attach`` puts the generation into the student's plan: teacher.layout, kd.signal and its
reason, prediction.generation.
"""

from __future__ import annotations

from ..cost.generation import GenerationPrice, price_generation
from ..errors import Infeasible
from ..pins import needs_teacher
from ..problem import Problem
from ..schema.layers import split_layers
from ..schema.plan import KDPlan, Layout, Plan, RolePlan
from .candidates import divisors
from .decode import finalize_layout


def student_problem(problem: Problem) -> Problem:
    """The student's step problem: plain training (no teacher; teacher and kd pins dropped)."""
    pins = {k: v for k, v in problem.pins.items() if not needs_teacher(k)}
    return Problem(job=problem.job, teacher=None, student=problem.student, cluster=problem.cluster, pins=pins,
                   job_path=problem.job_path, students=problem.students)


def generation_layouts(problem: Problem) -> list[tuple[Layout, tuple[int, ...]]]:
    """Every generation layout of the teacher on all the cluster's GPUs the pins allow, with its
    layers per stage."""
    m, cl, pins = problem.teacher, problem.cluster, problem.pins
    n, gpn = cl.num_gpus, cl.groups[0].node.gpus_per_node
    mb = pins.get("teacher.micro_batch")
    out = []
    for tp in divisors(n):
        if m.num_heads % tp or m.num_kv_heads % tp or (tp > gpn and "teacher.tp" not in pins):
            continue
        if pins.get("teacher.tp", tp) != tp:
            continue
        for pp in divisors(n // tp):
            if pp > m.num_layers or pins.get("teacher.pp", pp) != pp:
                continue
            dp = n // (tp * pp)
            if pins.get("teacher.dp", dp) != dp:
                continue
            lay = Layout(tp=tp, pp=pp, dp=dp, num_gpus=n, micro_batch=mb or 1)
            out.append((lay, split_layers(m.num_layers, pp)))
    return out


def choose_generation(problem: Problem) -> tuple[Layout, tuple[int, ...], GenerationPrice]:
    """The fastest generation layout that fits (Infeasible naming what binds when none does)."""
    opts = generation_layouts(problem)
    if not opts:
        pins = {k: v for k, v in problem.pins.items() if k.startswith("teacher.")}
        raise Infeasible(f"no teacher generation layout satisfies --fix {pins} on {problem.cluster.num_gpus} GPUs "
                         "(tp must divide the heads and stay in a node, pp at most the layers)",
                         binding="pin", suggestion="relax the pin")
    best, why, least = None, "", None
    mb = problem.pins.get("teacher.micro_batch")
    for lay, counts in opts:
        g = price_generation(problem, lay, stage_layers=counts, decode_batch=mb * lay.pp if mb else None)
        if not g.fits:
            if least is None or lay.tp * lay.pp > least:
                least, why = lay.tp * lay.pp, f"tp={lay.tp} pp={lay.pp}: {g.why}"
            continue
        key = (g.cost.teacher_pass_s_per_step, lay.tp * lay.pp)
        if best is None or key < best[0]:
            best = (key, lay, counts, g)
    if best is None:
        raise Infeasible(f"the teacher {problem.teacher.name} cannot generate on {problem.cluster.num_gpus} GPUs: "
                         f"no layout fits (largest tried, {why})", binding="teacher memory",
                         suggestion="more GPUs, or GPUs with more memory")
    _, lay, counts, g = best
    lay = lay.model_copy(update={"micro_batch": g.cost.decode_batch // lay.pp})
    return lay, counts, g


def attach(problem: Problem, plan: Plan, layout: Layout, counts: tuple[int, ...], gen: GenerationPrice) -> Plan:
    """The student's plain-training plan turned into the sequence-level KD plan."""
    cl, job = problem.cluster, problem.job
    gpu = cl.groups[0].node.gpu
    tl = finalize_layout(layout, problem.teacher.num_layers, 0, counts, lambda r: gpu)
    kd = KDPlan(signal="sequence", signal_reason=problem.kd_signal_reason, mode="offline", placement="colocated",
                loss=job.kd.loss, temperature=job.kd.temperature, alpha=0.0, beta=job.kd.beta,
                compression="dense", vocab_size=None)
    pred = plan.prediction.model_copy(update={"generation": gen.cost})
    return plan.model_copy(update={"teacher": RolePlan(source=str(job.teacher), model=problem.teacher, layout=tl),
                                   "kd": kd, "prediction": pred})
