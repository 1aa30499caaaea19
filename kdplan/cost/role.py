"""Price one role (student training or teacher forward) on its GPUs for one optimizer step.

The whole global batch B goes through each role: a role with data-parallel degree dp and
micro-batch b runs m = B / (dp * b) micro-batches per pipeline. When dp * b does not divide B,
the layout is priced as not fitting (``fits=False`` with the reason), never raised: the solver
enumerates such layouts and filters them out.

Per pipeline stage and micro-batch: forward (and backward) compute of its blocks (plus the
vocabulary projection and loss on the last stage), tensor-parallel collectives (exposed: the
runtime waits for them), and the point-to-point sends to the neighbour stages (blocking, so
exposed on every micro-batch: see api.py). Each stage's parts are kept apart in ``StageTime``
for the simulator. Pipeline time for
per-micro-batch stage times t_i and v virtual chunks: m * max(t) + (sum(t) - max(t)) / v, which
is (m + p - 1) * t for balanced stages, sum + (m - 1) * max for unbalanced ones and a bubble of
(p - 1) * t / v interleaved. Then the data-parallel gradient reduction (only the part the last
micro-batch's backward does not hide), ZeRO-3 parameter gathers, offload over PCIe and the
optimizer step.
"""

from __future__ import annotations

from ..problem import Problem
from ..schema.cluster import GPUSpec
from ..schema.compression import Compression
from ..schema.layers import split_layers
from ..schema.model import ModelSpec
from ..schema.plan import Layout
from . import comm
from .api import RolePrice, StageTime
from .compute import (PRECISION_BYTES, layer_time, logits_time, loss_passes, loss_time, optimizer_time,
                      peak_flops)
from .flops import train_model_flops, forward_flops
from .memory import GIB, activation_bytes_per_layer, in_flight, logits_bytes, model_state_bytes

DISAGG_IN_FLIGHT = 2  # teacher outputs a disaggregated student buffers (KDPlan.max_in_flight)


def layout_key(lay: Layout) -> tuple:
    return (lay.tp, lay.pp, lay.dp, lay.zero, lay.micro_batch, lay.recompute, lay.sequence_parallel,
            lay.virtual_stages, lay.schedule, lay.offload, lay.grad_compression, lay.forward_precision)


def _invalid(role: str, why: str) -> RolePrice:
    return RolePrice(role=role, time_s=float("inf"), compute_s=0.0, bubble_s=0.0, fits=False, why=why)


def _check(problem: Problem, model: ModelSpec, lay: Layout, role: str,
           stage_layers: tuple[int, ...] | None) -> str:
    """Structural reasons a layout cannot run at all ('' when it can)."""
    B = problem.job.global_batch
    if lay.tp * lay.pp * lay.dp > problem.cluster.num_gpus:
        return f"{role} needs {lay.tp * lay.pp * lay.dp} GPUs but the cluster has {problem.cluster.num_gpus}"
    if model.num_heads % lay.tp:
        return f"{role} tp={lay.tp} does not divide its {model.num_heads} attention heads"
    if B % (lay.dp * lay.micro_batch):
        return (f"global batch {B} is not divisible by {role} dp*micro_batch = "
                f"{lay.dp}*{lay.micro_batch} = {lay.dp * lay.micro_batch}")
    if stage_layers is not None:
        if len(stage_layers) != lay.pp or sum(stage_layers) != model.num_layers or min(stage_layers) < 1:
            return f"{role} stage layers {list(stage_layers)} do not split {model.num_layers} layers into pp={lay.pp} stages"
    elif lay.pp > model.num_layers:
        return f"{role} pp={lay.pp} exceeds its {model.num_layers} layers"
    v = lay.virtual_stages
    if v > 1 and model.num_layers < lay.pp * v:
        return f"{role} pp*virtual_stages = {lay.pp * v} exceeds its {model.num_layers} layers"
    return ""


def _layer_time(problem: Problem, model: ModelSpec, gpu: GPUSpec, prec: str, b: int, s: int, tp: int,
                fused: bool, gemm: str | None = None):
    """layer_time, memoised per problem (thousands of layouts share a few shapes)."""
    key = ("layer", model.name, id(model), gpu.name, b, tp, fused) + ((gemm,) if gemm else ())
    c = problem.memo().prices
    lt = c.get(key)
    if lt is None:
        lt = c[key] = layer_time(model, gpu, prec, b=b, s=s, tp=tp, fused_attention=fused, gemm_precision=gemm)
    return lt


def block_weight_bytes(model: ModelSpec, tp: int, q: int, forward_precision: str) -> float:
    """Bytes of one transformer block's weights on one GPU: q per parameter, or for a quantized
    teacher (fp8/int8) 1 byte per Linear weight plus one fp32 scale per output channel (norms
    and biases stay at q bytes: they are a negligible share)."""
    lp = model.layer_params() / tp
    if forward_precision == "bf16":
        return lp * q
    from ..teacher_precision import SCALE_BYTES, WEIGHT_BYTES
    h, f, d, g = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.num_kv_heads
    linear = (h * (h + 2 * g * d) + h * h + h * f * (3 if model.gated_mlp else 2)) / tp
    out_channels = (h + 2 * g * d) / tp + h + f / tp * (2 if model.gated_mlp else 1) + h
    return linear * WEIGHT_BYTES[forward_precision] + out_channels * SCALE_BYTES + (lp - linear) * q


def kd_buffer_bytes(problem: Problem, lay: Layout, compression: Compression, mode: str,
                    placement: str) -> float:
    """Teacher outputs the student's last stage holds (plus the KD loss workspace), bytes per GPU."""
    if problem.teacher is None:
        return 0.0
    b, s, V = lay.micro_batch, problem.job.seq_len, problem.student.vocab_size
    q = PRECISION_BYTES[problem.job.precision]
    per_mb = b * s * compression.bytes_per_token(V, q)
    split = lay.tp if problem.cluster.overheads.vocab_parallel_loss else 1
    if compression.kind == "dense":
        per_mb /= split  # vocabulary-parallel: each tp rank holds its slice
    workspace = b * s * V / split * 4  # fp32 teacher probabilities / KL terms
    held = 1 if (mode == "online" and placement == "colocated") else DISAGG_IN_FLIGHT
    return held * per_mb + workspace


def price_role(problem: Problem, model: ModelSpec, lay: Layout, *, role: str, train: bool,
               group: int = 0, stage_layers: tuple[int, ...] | None = None,
               stage_groups: tuple[int, ...] | None = None, kd_bytes: float = 0.0,
               kd: str | None = None, topk: int = 0) -> RolePrice:
    """The cost of one role per optimizer step (see the module docstring). ``kd`` is the teacher
    outputs' compression kind ("dense" | "topk") when the role's loss involves them (compute.loss_passes);
    ``topk`` its k (the teacher's top-k encoding is priced per k by the device profile)."""
    why = _check(problem, model, lay, role, stage_layers)
    if why:
        return _invalid(role, why)
    cl, job = problem.cluster, problem.job
    ov = cl.overheads
    B, s, prec = job.global_batch, job.seq_len, job.precision
    q = PRECISION_BYTES[prec]
    tp, pp, dp, b, v = lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.virtual_stages
    m = B // (dp * b)
    if v > 1 and m % pp:
        return _invalid(role, f"interleaved 1F1B needs micro-batches per pipeline ({m}) divisible by pp={pp}")
    # Virtual stages imply the interleaved schedule (Megatron); GPipe and 1F1B share the bubble.
    schedule = "interleaved_1f1b" if v > 1 else ("gpipe" if lay.schedule == "gpipe" else "1f1b")
    layers = stage_layers or split_layers(model.num_layers, pp)
    groups = stage_groups or (group,) * pp
    h, V = model.hidden_size, model.vocab_size
    sbh = b * s * h

    # Parameters per GPU on each stage (tp-sharded blocks, vocabulary-parallel embeddings).
    emb_in = V * h / tp + (model.max_positions * h if model.learned_positions else 0)
    emb_out = V * h / tp if (not model.tied_embeddings or pp > 1) else 0.0

    p2p_bytes = sbh * q / (tp if (lay.sequence_parallel or ov.p2p_scatter_gather) else 1)
    tp_bytes = sbh * q
    recompute = lay.recompute if train else "none"
    act_layer = activation_bytes_per_layer(model, b=b, s=s, tp=tp, sequence_parallel=lay.sequence_parallel,
                                           recompute=recompute, q=q, flash=ov.fused_attention)
    full_layer = activation_bytes_per_layer(model, b=b, s=s, tp=tp, sequence_parallel=lay.sequence_parallel,
                                            recompute="none", q=q, flash=ov.fused_attention)
    grad_comm_bytes = 1.0 if lay.grad_compression == "int8" else 4.0

    stages: list[StageTime] = []
    loss_mb: list[float] = []
    per_mb: list[float] = []
    comp_mb: list[float] = []
    mems: list[tuple[float, dict[str, float]]] = []
    tp_s = p2p_s = dp_exposed = zero3_exposed = offload_exposed = opt_s = 0.0
    tp_total = pp_total = grad_total = param_total = offload_total = 0.0
    layer_params = model.layer_params()
    hw = {g: (cl.gpu_of_group(g), cl.groups[g].node) for g in set(groups)}
    # A quantized forward-only teacher (Layout.forward_precision): low-precision block GEMMs and
    # 1-byte block weights; the student always trains at the job's precision.
    fprec = lay.forward_precision if role == "teacher" else "bf16"
    gemm = None if fprec == "bf16" else fprec
    block_bytes = block_weight_bytes(model, tp, q, fprec)
    for i in range(pp):
        gpu, node = hw[groups[i]]
        lt = _layer_time(problem, model, gpu, prec, b, s, tp, ov.fused_attention, gemm)
        n_l = layers[i]
        first, last = i == 0, i == pp - 1
        params = n_l * layer_params / tp + (emb_in if first else 0) + (emb_out if last else 0)
        # bytes of this stage's weights on one GPU (params * q unless the teacher is quantized)
        wbytes = params * q if gemm is None else \
            n_l * block_bytes + ((emb_in if first else 0) + (emb_out if last else 0)) * q

        # Compute per micro-batch (plus the fixed per-block cost: a third forward, two backward).
        fwd = n_l * (lt.forward_s + ov.layer_overhead_s / 3)
        if last:
            fwd += logits_time(model, gpu, prec, b=b, s=s, tp=tp) * (1 + gpu.efficiency.elementwise_overhead_fraction)
        bwd = 0.0
        if train:
            bwd = 2.0 * fwd
            if recompute == "full":
                bwd += n_l * lt.forward_s
            elif recompute == "selective":
                bwd += n_l * lt.attn_core_s
        # The loss over the vocabulary (CE, KD, the teacher's top-k): memory bound, vocabulary-
        # parallel over tp; its forward and backward passes are priced together in the backward
        # (training) or the forward (the teacher).
        loss = 0.0
        vocab_split = tp if ov.vocab_parallel_loss else 1  # else: gathered logits, whole loss per rank
        n_loss = loss_passes(train=train, kd=kd, gpu=gpu, k=topk, vocab=V)
        if last and n_loss:
            loss = loss_time(gpu, b * s * V / vocab_split, n_loss, ov.loss_bytes_per_s_fraction)
            if train:
                bwd += loss
            else:
                fwd += loss

        # Tensor-parallel collectives (Megatron: 2 all-reduces per block forward, 2 backward,
        # 2 more when full recomputation repeats the forward; the embedding adds one).
        ar = comm.allreduce_time(node, tp_bytes, tp, 1)
        n_ar_f = 2 * n_l + (1 if first else 0)
        n_ar_b = (2 * n_l + (2 * n_l if recompute == "full" else 0) + (1 if last else 0)) if train else 0
        tp_f, tp_b = n_ar_f * ar, n_ar_b * ar
        if tp > 1:
            tp_total += (n_ar_f + n_ar_b) * 2 * (tp - 1) / tp * tp_bytes * tp * dp * m
            if last and not ov.vocab_parallel_loss:  # all-gather of the logits in the forward
                tp_f += comm.allgather_time(node, b * s * V * q, tp, 1)
                tp_total += (tp - 1) / tp * b * s * V * q * tp * dp * m

        # Pipeline point-to-point (each of v chunks sends forward; backward sends back).
        p2p = one = 0.0
        sends_mb = 0
        if pp > 1:
            # Neighbour stages are tp*dp ranks apart; a stage in another group (mixed cluster)
            # is on another node, reached at the slower of the two nodes' network rates.
            j = min(i + 1, pp - 1)
            if groups[j] == groups[i]:
                one = comm.p2p_time(node, p2p_bytes, tp * dp)
            else:
                other = cl.groups[groups[j]].node
                slow = min((node, other), key=lambda nd: nd.inter_node.bandwidth_gb_per_s * nd.inter_node.efficiency)
                one = comm.link_time(slow.inter_node, p2p_bytes, op="send_recv")
            # Interleaved: chunk c of the last rank feeds chunk c + 1 of the first, so only the
            # model's last chunk sends nothing forward and its first nothing back.
            sends_mb = (v - (1 if last else 0)) + ((v - (1 if first else 0)) if train else 0)
            p2p = sends_mb * one
            pp_total += sends_mb * p2p_bytes * tp * dp * m

        # ZeRO-3: gather the weights for every forward and backward (and recompute) pass.
        z3 = 0.0
        if lay.zero >= 3 and dp > 1:
            passes = (1 + (1 if train else 0) + (1 if recompute == "full" else 0))
            # One flat collective per layer over the whole dp group: it runs at each GPU's own
            # inter-node rate (Narayanan et al. Table 2: ZeRO-3 step time flat from 768 to 1536
            # GPUs at 8 bytes/parameter), not at the hierarchical rate of a bucketed all-reduce.
            gather = comm.flat_allgather_time(node, wbytes, dp, tp) * passes
            scatter = comm.flat_allgather_time(node, params * q, dp, tp, op="reduce_scatter") if train else 0.0
            # Prefetched behind compute, which the overlap slows down; the slower side binds.
            z3 = max((fwd + bwd) * ov.overlap_slowdown, gather + scatter) - (fwd + bwd)
            param_total += passes * (dp - 1) / dp * wbytes * tp * dp * m
            grad_total += ((dp - 1) / dp * params * q * tp * dp * m) if train else 0.0

        # Host streaming of offloaded teacher weights: once per micro-batch, prefetched.
        off = 0.0
        if lay.offload == "weights":
            stream = comm.link_time(node.host, wbytes, messages=n_l)
            off = max(0.0, stream - fwd)
            offload_total += wbytes * tp * dp * m

        t_f = fwd + tp_f + (p2p / 2 if train else p2p)
        t_b = bwd + tp_b + (p2p / 2 if train else 0.0)
        per_mb.append(t_f + t_b + z3 + off)
        comp_mb.append(fwd + bwd)
        loss_mb.append(loss)
        stage_tp = tp_f + tp_b
        if i == 0 or per_mb[-1] >= max(per_mb[:-1]):
            tp_s, p2p_s = stage_tp, p2p
            zero3_exposed, offload_exposed = z3, off

        # Data-parallel gradient reduction, overlapped with the last micro-batch's backward.
        t_dp = 0.0
        if train and dp > 1 and lay.zero < 3:
            grads = params * grad_comm_bytes
            if lay.zero >= 1:  # reduce-scatter the gradients, all-gather the updated weights
                t_dp = (comm.reduce_scatter_time(node, grads, dp, tp)
                        + comm.allgather_time(node, params * q, dp, tp))
            else:
                t_dp = comm.allreduce_time(node, grads, dp, tp)
            if lay.grad_compression == "int8":  # quantize + dequantize: memory bound
                t_dp += params * 10 / (gpu.memory_bandwidth_gb_per_s * 1e9)
            window = bwd * (1 - 1 / max(n_l, 1)) if ov.overlap_grad_reduce else 0.0
            # Buckets of 1/n_l of the gradients, each ready as its layer's backward ends: the last
            # one always follows the backward; the rest hide while the link keeps up.
            tail = t_dp / max(n_l, 1) if ov.overlap_grad_reduce else t_dp
            dp_exposed = max(dp_exposed, tail, t_dp - window)
            grad_total += (dp - 1) / dp * (grads + (params * q if lay.zero >= 1 else grads)) * tp * dp
        if train:
            local = params / (dp if lay.zero >= 1 else 1)
            if lay.offload == "optimizer":
                pcie = comm.link_time(node.host, local * (grad_comm_bytes + q))
                opt_i = pcie + local * 30.0 / (ov.host_optimizer_gb_per_s * 1e9)
                offload_total += local * (grad_comm_bytes + q) * tp * dp
            else:
                opt_i = optimizer_time(gpu, local, ov.optimizer_bytes_per_s_fraction)
            opt_s = max(opt_s, opt_i)

        # Memory of one GPU of this stage.
        terms: dict[str, float] = {}
        if train:
            st = model_state_bytes(params, dp=dp, zero=lay.zero, weight_bytes=q,
                                   grad_bytes=(4 if (ov.fp32_main_grads and q == 2) else q),
                                   optimizer_bytes=(12 if q == 2 else 8))
            if lay.offload == "optimizer":
                st["optimizer"] = 0.0
            terms.update(st)
            if lay.zero >= 3:
                terms["gathered_params"] = layer_params / tp * q  # the block in use
            held = in_flight(schedule, stage=i, pp=pp, m=m, v=v)
            terms["activations"] = n_l * act_layer * held
            if recompute == "full":
                terms["activations"] += full_layer  # one block recomputed in backward
        else:
            w = wbytes / (dp if lay.zero >= 3 else 1)
            if lay.offload == "weights":
                w = 2 * block_bytes  # double-buffered streamed blocks
            terms["weights"] = w
            # Forward only: one block's working set plus the inputs of micro-batches in flight.
            terms["activations"] = full_layer + sbh * q * min(pp - i, m)
        if last:
            terms["logits"] = logits_bytes(model, b=b, s=s, tp=vocab_split, q=q)
            if kd_bytes:
                terms["kd_buffers"] = kd_bytes
        allocated = sum(terms.values())
        terms["fragmentation"] = allocated * ov.fragmentation_fraction
        terms["framework"] = ov.framework_memory_gib * GIB
        mem = sum(terms.values())
        mems.append((mem, terms))
        stages.append(StageTime(forward_s=t_f, backward_s=t_b, p2p_s=one, memory_gib=mem / GIB,
                                busy_forward_s=fwd + tp_f, busy_backward_s=bwd + tp_b, tp_s=tp_f + tp_b,
                                sends=sends_mb, grad_reduce_s=t_dp, params_s=z3, offload_s=off,
                                loss_s=loss))

    t_max = max(per_mb)
    pipe = m * t_max + (sum(per_mb) - t_max) / v
    bubble = (sum(per_mb) - t_max) / v
    # Compute on the critical path: the slowest stage's busy compute over the step.
    slow = per_mb.index(t_max)
    compute = m * comp_mb[slow]
    exposed = {"tensor_parallel": m * tp_s, "pipeline": m * p2p_s, "gradients": dp_exposed,
               "params": m * zero3_exposed}
    exposed = {k: x for k, x in exposed.items() if x > 0}
    off_total = m * offload_exposed
    time_s = pipe + dp_exposed + opt_s
    fi = max(range(pp), key=lambda j: mems[j][0])
    mem, terms = mems[fi]
    gpu0 = cl.gpu_of_group(groups[fi])
    fits = mem <= gpu0.memory_gib * GIB
    out_why = ""
    if not fits:
        big = max((k for k in terms if k not in ("framework", "fragmentation")), key=terms.get)
        out_why = (f"micro-batch {b} still needs {mem / GIB:.1f} GiB on {role} pipeline stage {fi} "
                   f"(largest: {big} {terms[big] / GIB:.1f} GiB) > {gpu0.name} {gpu0.memory_gib:g} GiB")
    bytes_by_kind = {"tensor_parallel": tp_total, "pipeline": pp_total, "gradients": grad_total,
                     "params": param_total, "offload": offload_total}
    mf = train_model_flops(model, sequences=B, s=s) if train else forward_flops(model, b=B, s=s)
    return RolePrice(
        role=role, time_s=time_s, compute_s=compute, bubble_s=bubble, comm_exposed_s=exposed,
        memory_gib=mem / GIB, memory_terms_gib={k: x / GIB for k, x in terms.items()},
        fullest_stage=fi, bytes_per_step={k: x for k, x in bytes_by_kind.items() if x > 0},
        model_flops=mf, num_micro_batches=m, stages=stages, optimizer_s=opt_s, fits=fits,
        why=out_why, offload_s=off_total, loss_s=m * loss_mb[slow],
    )


def cached_price(problem: Problem, key: tuple, fn) -> RolePrice:
    c = problem.memo().prices
    r = c.get(key)
    if r is None:
        r = c[key] = fn()
    return r


def role_peak(problem: Problem, group: int = 0) -> float:
    return peak_flops(problem.cluster.gpu_of_group(group), problem.job.precision)
