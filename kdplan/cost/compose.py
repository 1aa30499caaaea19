"""Public pricing functions: one role, the teacher-to-student transfer, and a whole candidate
composed by the rules in api.py into the ``Prediction`` of design.md section 3 (``predict``;
kdplan.cost.prediction.evaluate adds the comparison with the baselines, which are themselves
candidates priced here, so this module never imports kdplan.cost.baselines).
"""

from __future__ import annotations

import math

from ..errors import Infeasible, InputError
from ..problem import Problem
from ..schema.compression import Compression
from ..schema.plan import Layout, MemoryBreakdown, OfflineCost, Prediction
from . import comm
from .api import Candidate, RolePrice, TransferPrice
from .compute import PRECISION_BYTES, peak_flops
from .job import offline_read_gb_per_s
from .role import cached_price, kd_buffer_bytes, layout_key, price_role

HOST_KINDS = ("offload",)  # bytes_per_step kinds that cross host links, not device-to-device ones


def price_student(problem: Problem, layout: Layout, *, compression: Compression, mode: str = "online",
                  placement: str = "colocated", group: int = 0, stage_layers: tuple[int, ...] | None = None,
                  stage_groups: tuple[int, ...] | None = None) -> RolePrice:
    """Training cost of the student per optimizer step (whole global batch) on its GPUs.

    ``compression``, ``mode`` and ``placement`` size the teacher-output buffers on the last
    stage (nothing when the problem has no teacher). Layouts whose dp * micro_batch does not
    divide the global batch (or otherwise cannot run) come back with fits=False and the reason.
    Results are cached per problem and layout: treat them as read-only.
    """
    sl = tuple(stage_layers) if stage_layers else None
    sg = tuple(stage_groups) if stage_groups else None
    key = ("student", layout_key(layout), str(compression), mode, placement, group, sl, sg)
    kd = kd_buffer_bytes(problem, layout, compression, mode, placement)
    kind = compression.kind if problem.teacher is not None else None
    return cached_price(problem, key, lambda: price_role(
        problem, problem.student, layout, role="student", train=True, group=group,
        stage_layers=sl, stage_groups=sg, kd_bytes=kd, kd=kind))


def price_teacher(problem: Problem, layout: Layout, *, compression: Compression, group: int = 0) -> RolePrice:
    """Forward-only cost of the teacher per optimizer step: no gradients, no optimizer state, no
    stored activations. ``layout.offload == "weights"`` keeps the weights in host memory and
    streams them over PCIe for every micro-batch (prefetched behind the forward)."""
    if problem.teacher is None:
        return RolePrice(role="teacher", time_s=0.0, compute_s=0.0, bubble_s=0.0)
    key = ("teacher", layout_key(layout), str(compression), group)
    return cached_price(problem, key, lambda: price_role(
        problem, problem.teacher, layout, role="teacher", train=False, group=group, kd=compression.kind,
        topk=compression.k))


def _node(problem: Problem, group: int):
    return problem.cluster.groups[group].node


def price_transfer(problem: Problem, candidate: Candidate) -> TransferPrice:
    """Teacher outputs to the student per step at the candidate's compression.

    Colocated online with the same tp/pp/dp: the outputs never leave the GPU (0 bytes).
    Colocated with another layout: they cross the group's links. Disaggregated: the teacher's
    last-stage GPUs send to the student's last-stage GPUs over the link between the groups,
    pipelined over micro-batches (exposed: what exceeds the slower side plus one micro-batch's
    transfer to fill the pipe). Offline: the student reads them from storage, prefetched across steps.
    """
    if problem.teacher is None:
        return TransferPrice(0.0, 0.0, 0.0, 0.0)
    job, st, te = problem.job, candidate.student, candidate.teacher
    q = PRECISION_BYTES[job.precision]
    per_token = candidate.compression.bytes_per_token(problem.kd_vocab_size, q)
    total = job.global_batch * job.seq_len * per_token
    m = max(1, job.global_batch // (st.dp * st.micro_batch))
    if candidate.mode == "offline":
        t = offline_read_s(problem, st, total, candidate.student_group)
        s_price = price_student(problem, st, compression=candidate.compression, mode="offline",
                                placement=candidate.placement, group=candidate.student_group)
        # The reader prefetches across steps (it never drains), so only reads slower than the
        # student's compute are exposed: no per-step fill.
        exposed = max(0.0, t - s_price.compute_s)
        return TransferPrice(total, t, exposed, per_token)
    if te is None:
        return TransferPrice(0.0, 0.0, 0.0, per_token)
    if candidate.placement == "colocated" and (te.tp, te.pp, te.dp, te.cp) == (st.tp, st.pp, st.dp, st.cp):
        return TransferPrice(0.0, 0.0, 0.0, per_token)
    node = _node(problem, candidate.student_group)
    senders = te.stage_gpus
    receivers = st.stage_gpus
    if candidate.placement == "colocated":
        link = node.intra_node if st.num_gpus <= node.gpus_per_node else node.inter_node
    else:
        both = st.num_gpus + te.num_gpus
        same = candidate.student_group == candidate.teacher_group and both <= node.gpus_per_node
        link = node.intra_node if same else node.inter_node
        t_node = _node(problem, candidate.teacher_group)
        if t_node.inter_node.bandwidth_gb_per_s < link.bandwidth_gb_per_s and not same:
            link = t_node.inter_node
    lanes = max(1, min(senders, receivers))
    t = comm.link_time(link, total / lanes, messages=m, op="send_recv")
    if candidate.placement == "colocated":
        return TransferPrice(total, t, t, per_token)
    s_price = price_student(problem, st, compression=candidate.compression, placement="disaggregated",
                            group=candidate.student_group)
    t_price = price_teacher(problem, te, compression=candidate.compression, group=candidate.teacher_group)
    slower = max(s_price.time_s, t_price.steady_time_s)
    exposed = max(0.0, t - slower) + t / m
    return TransferPrice(total, t, exposed, per_token)


def offline_read_s(problem: Problem, student: Layout, nbytes: float, group: int = 0) -> float:
    """Seconds to read ``nbytes`` of cached teacher outputs (one step's) for a student laid out as
    ``student``: every node it spans reads its own share at the first storage tier's per-node rate
    (cost.job.offline_read_gb_per_s). Read once per step however many students train on them in
    one run (executor.teacher.Targets.fetch_all)."""
    nodes = max(1, -(-student.num_gpus // _node(problem, group).gpus_per_node))
    read = offline_read_gb_per_s(problem.cluster)
    if read is None:
        raise InputError(f"kd.mode offline: cluster {problem.cluster.name} lists no storage to read the teacher"
                         " outputs from (groups[].node.local_storage or shared_storage; `kdplan profile`"
                         " measures one)")
    return nbytes / (read * 1e9 * nodes)


def gpus_used(candidate: Candidate) -> int:
    st, te = candidate.student, candidate.teacher
    if candidate.mode == "online" and candidate.placement == "disaggregated" and te is not None:
        return st.num_gpus + te.num_gpus
    return st.num_gpus


def gpus_by_group(candidate: Candidate) -> dict[int, int]:
    """GPUs used per cluster group: each student stage's tp*dp*cp GPUs in its group (mixed
    clusters), plus a disaggregated online teacher's GPUs in the teacher's group."""
    st, te = candidate.student, candidate.teacher
    out: dict[int, int] = {}
    for g in candidate.student_stage_groups or (candidate.student_group,) * st.pp:
        out[g] = out.get(g, 0) + st.stage_gpus
    if candidate.mode == "online" and candidate.placement == "disaggregated" and te is not None:
        out[candidate.teacher_group] = out.get(candidate.teacher_group, 0) + te.num_gpus
    return out


def _pipeline(slots: list[float], m: int, v: int) -> tuple[float, float]:
    """m micro-batches through stages of these per-micro-batch slots, v chunks each (role.py):
    (steady part, bubble)."""
    top = max(slots)
    return m * top, (sum(slots) - top) / v


def colocated_teacher_s(student: RolePrice, teacher: RolePrice, virtual_stages: int = 1) -> float:
    """What a colocated online teacher adds to the student's step (api.py composition rules).

    Its forward for student micro-batch j runs on the same GPUs right before the student's
    forward of j, so it widens that stage's slot by T_i (the teacher's work per student
    micro-batch there) and the pipeline formula charges it m + (p - 1) / v times, fill and
    drain included. Same pipeline depth (the mirror layout): stage i of the teacher sits on
    stage i of the student. Another split: every GPU carries a share of the teacher, the
    slowest at its steady rate, T = teacher.steady_time_s / m on every stage.
    """
    return sum(colocated_teacher_parts(student, teacher, virtual_stages))


def colocated_teacher_parts(student: RolePrice, teacher: RolePrice, virtual_stages: int = 1) -> tuple[float, float]:
    """colocated_teacher_s split into (the teacher's forwards on the slowest GPU, the bubble
    they add to the student's pipeline fill and drain)."""
    if not student.stages or not teacher.stages:
        return teacher.steady_time_s, teacher.bubble_s
    m, p = student.num_micro_batches, len(student.stages)
    scale = teacher.num_micro_batches / m  # teacher micro-batches per student micro-batch
    if len(teacher.stages) == p:
        extra = [x.per_micro_batch_s * scale for x in teacher.stages]
    else:
        extra = [teacher.steady_time_s / m] * p
    own = [x.per_micro_batch_s for x in student.stages]
    busy, bubble = _pipeline([a + b for a, b in zip(own, extra)], m, virtual_stages)
    busy0, bubble0 = _pipeline(own, m, virtual_stages)
    return busy - busy0, bubble - bubble0


def compose(problem: Problem, candidate: Candidate) -> tuple[float, RolePrice, RolePrice | None, TransferPrice]:
    """Step time of a candidate by the api.py rules, with its parts (fast: no pydantic)."""
    s = price_student(problem, candidate.student, compression=candidate.compression, mode=candidate.mode,
                      placement=candidate.placement, group=candidate.student_group,
                      stage_layers=candidate.student_stage_layers, stage_groups=candidate.student_stage_groups)
    t = None
    if problem.teacher is not None and candidate.teacher is not None and candidate.mode == "online":
        t = price_teacher(problem, candidate.teacher, compression=candidate.compression,
                          group=candidate.teacher_group if candidate.placement == "disaggregated"
                          else candidate.student_group)
    x = price_transfer(problem, candidate)
    if t is None:
        step = s.time_s + x.exposed_s
    elif candidate.placement == "disaggregated":
        step = max(t.steady_time_s, s.time_s) + x.exposed_s
    else:
        step = s.time_s + colocated_teacher_s(s, t, candidate.student.virtual_stages) + x.exposed_s
    return step + problem.cluster.overheads.step_overhead_s, s, t, x


def colocated_memory(s: RolePrice, t: RolePrice) -> tuple[float, int, dict[str, float]]:
    """Fullest GPU when teacher and student share GPUs: (GiB, stage, terms). Stage-wise when both
    pipelines have the same depth (stage i of each on the same GPUs), else the two maxima added;
    one runtime (framework allowance) per GPU. The terms are those of each role's fullest stage."""
    framework = t.memory_terms_gib.get("framework", 0.0)
    if len(s.stages) == len(t.stages) and s.stages:
        totals = [a.memory_gib + c.memory_gib - framework for a, c in zip(s.stages, t.stages)]
        i = max(range(len(totals)), key=totals.__getitem__)
        total = totals[i]
    else:
        i, total = s.fullest_stage, s.memory_gib + t.memory_gib - framework
    terms = dict(s.memory_terms_gib)
    for k, x in t.memory_terms_gib.items():
        if k != "framework":
            terms["teacher_" + k] = x
    return total, i, terms


def predict(problem: Problem, candidate: Candidate) -> Prediction:
    """The prediction block of design.md section 3 for one candidate, without the baselines.

    A candidate that cannot run at all (a role's layout is invalid: batch not divisible, tp not
    dividing the heads, ...) raises Infeasible with the reason. One that runs out of memory is
    still priced: its memory block shows the fullest GPU above its limit.
    """
    step, s, t, x = compose(problem, candidate)
    if not math.isfinite(step):
        bad = s if not math.isfinite(s.time_s) else t
        raise Infeasible(f"this layout cannot run: {bad.why}", binding=bad.role)
    job, cl = problem.job, problem.cluster
    n_gpus = gpus_used(candidate)
    tokens = job.global_batch * job.seq_len
    # Each GPU at its own dense peak (and price): a mixed cluster's MFU is over the sum of peaks.
    used = gpus_by_group(candidate)
    peak_sum = sum(n * peak_flops(cl.gpu_of_group(g), job.precision) for g, n in used.items())
    flops = s.model_flops + (t.model_flops if t else 0.0)

    breakdown: dict[str, float] = {"compute": s.compute_s - s.loss_s - s.framework_s, "loss": s.loss_s,
                                   "bubble": s.bubble_s, "optimizer": s.optimizer_s}
    if s.framework_s:
        breakdown["framework"] = s.framework_s
    for k, v in s.comm_exposed_s.items():
        breakdown[f"comm_{k}"] = v
    if s.offload_s:
        breakdown["offload"] = s.offload_s
    idle: dict[str, float] = {}
    bytes_by_kind = dict(s.bytes_per_step)
    mem_roles = {"student": s.memory_gib}
    if t is not None:
        for k, v in t.bytes_per_step.items():
            bytes_by_kind[k] = bytes_by_kind.get(k, 0.0) + v
        mem_roles["teacher"] = t.memory_gib
        if candidate.placement == "disaggregated":
            t_steady = t.steady_time_s
            breakdown["teacher_wait"] = max(0.0, t_steady - s.time_s)
            idle["teacher"] = max(0.0, s.time_s - t_steady)
            idle["student"] = max(0.0, t_steady - s.time_s)
        else:
            busy, bubble = colocated_teacher_parts(s, t, candidate.student.virtual_stages)
            breakdown["teacher"] = busy
            breakdown["bubble"] += bubble  # its forwards also run in the student's fill and drain
        if t.offload_s:
            breakdown["offload"] = breakdown.get("offload", 0.0) + t.offload_s
    if x.exposed_s:
        breakdown["comm_teacher_outputs"] = x.exposed_s
    if cl.overheads.step_overhead_s:
        breakdown["step_overhead"] = cl.overheads.step_overhead_s
    bytes_by_kind["teacher_outputs"] = x.bytes_per_step

    if t is not None and candidate.placement == "colocated":
        mem, stage, terms = colocated_memory(s, t)
        role = "teacher+student"
        limit = cl.gpu_of_group(candidate.student_group).memory_gib
    elif t is not None and t.memory_gib > s.memory_gib:
        mem, stage, terms, role = t.memory_gib, t.fullest_stage, dict(t.memory_terms_gib), "teacher"
        limit = cl.gpu_of_group(candidate.teacher_group).memory_gib
    else:
        mem, stage, terms, role = s.memory_gib, s.fullest_stage, dict(s.memory_terms_gib), "student"
        limit = cl.gpu_of_group(candidate.student_group).memory_gib
    st = candidate.student
    rank = stage * st.stage_gpus
    largest = max((k for k in terms if k not in ("framework", "fragmentation")), key=terms.get, default="")

    if t is not None and candidate.placement == "disaggregated":
        busy = (s.compute_s * st.num_gpus + t.compute_s * candidate.teacher.num_gpus) / (step * n_gpus)
    else:
        busy = (s.compute_s + (t.compute_s if t else 0.0)) / step
    offline = None
    if candidate.mode == "offline" and problem.teacher is not None:
        offline = OfflineCost(teacher_pass_s_per_step=offline_teacher_pass(problem, candidate),
                              storage_bytes_per_token=x.bytes_per_token)
    prices = [cl.gpu_of_group(g).price_per_hour_usd for g in used]
    price_sum = sum(n * cl.gpu_of_group(g).price_per_hour_usd for g, n in used.items()) if all(prices) else None
    # Bytes over device-to-device links only: host offload traffic (PCIe weight streaming,
    # optimizer offload) stays in bytes_per_step["offload"] but is not "communication".
    total_bytes = sum(v for k, v in bytes_by_kind.items() if k not in HOST_KINDS)
    pred = Prediction(
        step_time_s=step, tokens_per_s=tokens / step, mfu=flops / (step * peak_sum),
        memory_per_gpu_gib=mem, comm_bytes_per_step=total_bytes, utilization=min(1.0, max(0.0, busy)),
        breakdown_s={k: v for k, v in breakdown.items() if v > 0},
        bytes_per_step=bytes_by_kind,
        memory=MemoryBreakdown(gpu_rank=rank, role=role, terms_gib=terms, largest_term=largest,
                               limit_gib=limit),
        memory_per_role_gib=mem_roles, idle_s=idle, offline=offline,
        cost_per_million_tokens_usd=(price_sum * step / 3600 / (tokens / 1e6)) if price_sum else None,
    )
    return pred


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def _lay(tp: int, pp: int, dp: int, b: int, rc: str = "none", zero: int = 0, offload: str = "none") -> Layout:
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch=b, recompute=rc, zero=zero, num_gpus=tp * pp * dp,
                  sequence_parallel=tp > 1, offload=offload)


def _micro_batches(per_replica: int) -> list[int]:
    return [b for b in _pow2_upto(min(per_replica, 64)) if per_replica % b == 0]


def offline_teacher_pass(problem: Problem, candidate: Candidate) -> float:
    """Teacher time to precompute one step's outputs on the candidate's GPUs (streamed, so at the
    teacher's steady rate): the given teacher
    layout, else the fastest teacher layout that fits on the student's GPU count; 0 when the pass
    is planned apart (Problem.teacher_pass_apart: the whole job's, on its GPUs)."""
    if problem.teacher_pass_apart:
        return 0.0
    if candidate.teacher is not None:
        t = price_teacher(problem, candidate.teacher, compression=candidate.compression,
                          group=candidate.teacher_group)
        if t.fits:  # the pass streams the whole data set: its pipeline fills once, not per step
            return t.steady_time_s
    best = fastest_teacher_forward_s(problem, gpus_used(candidate), candidate.compression)
    return best if best < float("inf") else 0.0


def fastest_teacher_forward_s(problem: Problem, n: int, compression: Compression) -> float:
    """The teacher's forward of one optimizer step's batch on ``n`` GPUs of the cluster's first
    group, streamed (its steady rate: the pipeline fills once per pass, not per step), at the
    fastest tp / pp / dp / micro-batch that fits; inf when none fits."""
    gpn = problem.cluster.groups[0].node.gpus_per_node
    B, best = problem.job.global_batch, float("inf")
    for tp in _pow2_upto(min(gpn, n)):
        if problem.teacher.num_heads % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if (n // tp) % pp or pp > problem.teacher.num_layers:
                continue
            dp = n // (tp * pp)
            if dp < 1 or B % dp:
                continue
            for b in _micro_batches(B // dp)[:4]:
                t = price_teacher(problem, _lay(tp, pp, dp, b), compression=compression)
                if t.fits:
                    best = min(best, t.steady_time_s)
    return best
