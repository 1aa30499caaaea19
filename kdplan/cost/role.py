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

from dataclasses import dataclass

from ..problem import Problem
from ..schema.cluster import GPUSpec, NodeSpec, Overheads
from ..schema.compression import Compression
from ..schema.layers import split_layers
from ..schema.model import ModelSpec
from ..schema.plan import Layout, context_parallel_error, expert_parallel_error
from . import comm
from .api import RolePrice, StageTime
from .compute import (PRECISION_BYTES, RING_GRAD_BYTES, head_elementwise_factor, layer_time, logit_softcap_passes,
                      logits_time, loss_heap_bytes, loss_passes, loss_size_factor, loss_time,
                      optimizer_time, peak_flops)
from .flops import train_model_flops, forward_flops
from .fp8 import block_linear_params, fp8_param_saving, fp8_saved_input_saving, fp8_weight_cache_bytes
from .overhead import FP32_GRAD_BYTES, ddp_sync_s, framework_overhead_s, optimizer_overhead_s, parameter_tensors
from .memory import (GIB, activation_bytes_per_layer, checkpointed_fraction, in_flight, logits_bytes, model_state_bytes,
                     op_policy_recompute_share, optimizer_step_bytes)

PERSISTENT_TERMS = ("weights", "gradients", "optimizer", "fp8_weights")  # memory terms allocated once, not per step
DISAGG_IN_FLIGHT = 2  # teacher outputs a disaggregated student buffers (KDPlan.max_in_flight)


def layout_key(lay: Layout) -> tuple:
    return (lay.tp, lay.pp, lay.dp, lay.cp, lay.ep, lay.zero, lay.micro_batch, lay.recompute, lay.sequence_parallel,
            lay.virtual_stages, lay.schedule, lay.offload, lay.grad_compression, lay.forward_precision,
            lay.shard, lay.train_precision)


def _invalid(role: str, why: str) -> RolePrice:
    return RolePrice(role=role, time_s=float("inf"), compute_s=0.0, bubble_s=0.0, fits=False, why=why)


def _check(problem: Problem, model: ModelSpec, lay: Layout, role: str,
           stage_layers: tuple[int, ...] | None) -> str:
    """Structural reasons a layout cannot run at all ('' when it can)."""
    B = problem.job.global_batch
    if lay.gpus > problem.cluster.num_gpus:
        return f"{role} needs {lay.gpus} GPUs but the cluster has {problem.cluster.num_gpus}"
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
    if lay.cp > 1:
        if why := context_parallel_error(problem.job.seq_len, lay, role):
            return why
        if not fused_attention(problem.cluster.overheads, model):
            return (f"{role} cp={lay.cp}: ring attention runs a fused (flash) attention kernel per ring step, and "
                    f"{model.name}'s attention runs unfused on this runtime")
        if lay.ep > 1:
            return f"{role} cp={lay.cp} with ep={lay.ep}: expert parallelism under context parallelism is not priced"
    if lay.train_precision == "fp8":
        if role == "teacher":
            return "teacher train_precision=fp8: the forward-only teacher does not train (see its forward_precision)"
        if problem.job.precision != "bf16":
            return f"{role} train_precision=fp8 needs a bf16 job (fp8 GEMMs inside bf16 mixed precision), not {problem.job.precision}"
        no_fp8 = sorted({g.name for g in (problem.cluster.gpu_of_group(i) for i in range(len(problem.cluster.groups)))
                         if g.peak.fp8_tflops is None})
        if no_fp8:
            return f"{role} train_precision=fp8: {', '.join(no_fp8)} has no fp8 tensor cores in its profile"
    if lay.ep > 1:
        if role != "teacher":
            return f"{role} ep={lay.ep}: expert parallelism is priced for the forward-only teacher only"
        if why := expert_parallel_error(model, lay, role):
            return why
        if lay.zero >= 3:
            return (f"{role} ep={lay.ep} with zero=3: the experts are split over ep already; FSDP over the "
                    "expert-data-parallel group is not priced")
    return ""


def fused_attention(ov: Overheads, model: ModelSpec) -> bool:
    """Whether ``model``'s attention runs as a fused kernel on this runtime: soft-capped scores
    (Gemma 2) run through eager attention in the executor (SDPA cannot cap them), so the score
    matrix is materialised and priced as an unfused kernel."""
    return ov.fused_attention and model.attn_logit_softcapping is None


def _layer_time(problem: Problem, model: ModelSpec, gpu: GPUSpec, prec: str, b: int, s: int, tp: int,
                fused: bool, gemm: str | None = None, ep: int = 1, cp: int = 1, train_fp8: bool = False):
    """layer_time, memoised per problem (thousands of layouts share a few shapes)."""
    ov = problem.cluster.overheads
    eager = ov.eager_elementwise_passes if ov.block_ops == "eager" else 0.0
    derating = ov.fp8_training_derating if train_fp8 else None
    key = (("layer", model.name, id(model), gpu.name, b, tp, fused, eager) + ((gemm, derating) if gemm else ())
           + ((ep,) if ep > 1 else ()) + (("cp", cp) if cp > 1 else ()))
    c = problem.memo().prices
    lt = c.get(key)
    if lt is None:
        lt = c[key] = layer_time(model, gpu, prec, b=b, s=s, tp=tp, fused_attention=fused, gemm_precision=gemm,
                                 ep=ep, expert_imbalance=ov.expert_load_imbalance, eager_passes=eager, cp=cp,
                                 derating=derating)
    return lt


def routed_expert_params(model: ModelSpec) -> float:
    """Parameters of one block's routed experts, averaged over the blocks (0 for a dense model):
    what expert parallelism splits."""
    if model.moe is None:
        return 0.0
    return model.moe_layers * model.moe.num_experts * model.expert_params() / model.num_layers


def rank_layer_params(model: ModelSpec, ep: int = 1) -> float:
    """Parameters of one block on one rank of an expert-parallel group (all tp ranks together):
    the block's, less the (ep-1)/ep of its routed experts the other ep ranks hold."""
    return model.layer_params() - routed_expert_params(model) * (1 - 1 / ep)


def expert_alltoall_bytes(model: ModelSpec, *, b: int, s: int, tp: int, q: int, imbalance: float) -> float:
    """One rank's buffer of one all-to-all of an MoE block under expert parallelism (dispatch;
    the combine sends the same back): each of its b*s/tp tokens (tokens are split over the tp
    ranks before dispatch, as with sequence parallelism) goes to k experts as an h-wide vector
    of q bytes, b*s*k*h*q/tp, times the busiest rank's ``imbalance``."""
    return b * s * model.moe.experts_per_token * model.hidden_size * q / tp * imbalance


def block_weight_bytes(model: ModelSpec, tp: int, q: int, forward_precision: str, ep: int = 1) -> float:
    """Bytes of one transformer block's weights on one GPU: q per parameter, or for a quantized
    teacher (fp8/int8) 1 byte per Linear weight plus one fp32 scale per output channel (norms
    and biases stay at q bytes: they are a negligible share). Under expert parallelism the GPU
    holds 1/ep of the routed experts (rank_layer_params)."""
    lp = rank_layer_params(model, ep) / tp
    if forward_precision == "bf16":
        return lp * q
    from ..teacher_precision import SCALE_BYTES, WEIGHT_BYTES
    h, f, d, g = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.num_kv_heads
    linear = block_linear_params(model, ep, rank_layer_params(model, ep)) / tp
    if model.moe is not None or model.mla is not None:
        # Every Linear of the block (all experts); one scale per output channel, ~ weights / h.
        out_channels = linear / h
    else:
        out_channels = (model.q_width + 2 * g * d) / tp + h + f / tp * (2 if model.gated_mlp else 1) + h
    return linear * WEIGHT_BYTES[forward_precision] + out_channels * SCALE_BYTES + (lp - linear) * q


def kd_buffer_bytes(problem: Problem, lay: Layout, compression: Compression, mode: str,
                    placement: str) -> float:
    """Teacher outputs the student's last stage holds (plus the KD loss workspace), bytes per GPU."""
    if problem.teacher is None:
        return 0.0
    b, s, V = lay.micro_batch, problem.job.seq_len // lay.cp, problem.kd_vocab_size  # this rank's tokens
    q = PRECISION_BYTES[problem.job.precision]
    per_mb = b * s * compression.bytes_per_token(V, q)
    split = lay.tp if problem.cluster.overheads.vocab_parallel_loss else 1
    if compression.kind == "dense":
        per_mb /= split  # vocabulary-parallel: each tp rank holds its slice
    workspace = b * s * V / split * 4  # fp32 teacher probabilities / KL terms
    held = 1 if (mode == "online" and placement == "colocated") else DISAGG_IN_FLIGHT
    return held * per_mb + workspace


@dataclass(frozen=True)
class _Role:
    """What every cost term of one role reads: the problem, the layout and the shapes derived
    from them once (bytes per element ``q``, micro-batches per pipeline ``m``, ...)."""

    problem: Problem
    model: ModelSpec
    lay: Layout
    role: str
    train: bool
    q: int
    m: int
    recompute: str  # the layout's, or "none" for a forward-only role
    gemm: str | None  # low-precision forward GEMMs of a quantized teacher (None: the job's precision)
    train_gemm: str | None  # "fp8": a student trained with fp8 GEMMs (Layout.train_precision; kdplan.cost.fp8)
    block_bytes: float  # one block's weights on one GPU
    act_layer: float  # activations one block stores per micro-batch (this recompute)
    full_layer: float  # ... with nothing recomputed (a forward working set)
    grad_comm_bytes: float  # bytes per gradient element on the data-parallel wire
    ov: Overheads  # the cluster's runtime allowances
    sbh: float  # micro-batch x sequence (this rank's s/cp tokens) x hidden: one block input's elements
    s_loc: int  # tokens of each sequence on this rank: seq_len / cp
    layer_params: float  # one block's parameters (all tp ranks; 1/ep of the routed experts)
    expert_a2a_bytes: float  # one all-to-all's buffer per rank under expert parallelism (0: none)
    fp8_act_saving: float = 0.0  # bytes per block and micro-batch fp8 training saves on stored activations
    fp8_params: bool = False  # Overheads.fp8_params on a student trained in fp8: block Linear weights at 1 byte


@dataclass
class _Stage:
    """One pipeline stage's GPU: its layers, parameters and weight bytes."""

    index: int
    n_layers: int
    moe_layers: int  # of its blocks, those with an MoE MLP
    first: bool
    last: bool
    gpu: GPUSpec
    node: NodeSpec
    params: float  # parameters on one GPU of this stage
    weight_bytes: float  # their bytes (params * q unless the teacher is quantized)


def _stage_compute(r: _Role, st: _Stage, kd: str | None, topk: int) -> tuple[float, float, float]:
    """(forward, backward, loss) seconds per micro-batch of one stage's blocks, plus the
    vocabulary projection and the loss on the last stage (the fixed per-block and per-micro-batch
    costs are _framework's). The loss over the vocabulary (CE, KD, the teacher's
    top-k: memory bound, vocabulary-parallel over tp) sits in the backward when training, in the
    forward otherwise."""
    p, model, lay, ov = r.problem, r.model, r.lay, r.ov
    b, s, tp, prec = lay.micro_batch, p.job.seq_len, lay.tp, p.job.precision
    lt = _layer_time(p, model, st.gpu, prec, b, s, tp, fused_attention(ov, model), r.gemm or r.train_gemm,
                     lay.ep, lay.cp, train_fp8=r.train_gemm is not None)
    head = 0.0
    logit_elements = b * r.s_loc * model.vocab_size / _vocab_split(r)
    # a training step's head and loss at this micro-batch's logits size, as the profile measured
    # them against their price (GPUSpec.loss_size_factor; 1 where unmeasured)
    size_factor = loss_size_factor(st.gpu, logit_elements) if r.train and st.last else 1.0
    if st.last:
        head = (logits_time(model, st.gpu, prec, b=b, s=r.s_loc, tp=tp) * head_elementwise_factor(st.gpu)
                * size_factor)
    fwd = st.n_layers * lt.forward_s + head
    bwd = 0.0
    if r.train:
        # backward_s: 2 x forward (ring attention's merges not doubled), or its dispatch floor
        bwd = st.n_layers * lt.backward_s + 2.0 * head
        if r.recompute == "full":
            bwd += st.n_layers * lt.forward_s
        elif r.recompute == "selective":
            bwd += st.n_layers * _selective_recompute_s(r, lt)
    loss = 0.0
    n_loss = (loss_passes(train=r.train, kd=kd, gpu=st.gpu, k=topk, vocab=model.vocab_size)
              + logit_softcap_passes(model, train=r.train))
    if st.last and n_loss:
        loss = loss_time(st.gpu, logit_elements, n_loss, ov.loss_bytes_per_s_fraction) * size_factor
        if r.train:
            bwd += loss
        else:
            fwd += loss
    return fwd, bwd, loss


def _framework(r: _Role, st: _Stage) -> tuple[float, float]:
    """(forward, backward) fixed framework seconds per micro-batch of one stage (kdplan.cost.overhead):
    FSDP2 units where the role is sharded (a training role at zero >= 1, the forward-only teacher
    at zero 3), DTensor where tp > 1."""
    lay = r.lay
    return framework_overhead_s(r.ov, train=r.train, n_layers=st.n_layers, tp=lay.tp,
                                fsdp=lay.dp * lay.cp > 1 and lay.zero >= (1 if r.train else 3))


def _selective_recompute_s(r: _Role, lt) -> float:
    """Forward work selective recomputation repeats per block, by the runtime's policy
    (Overheads.selective_recompute): the attention core (Megatron); half the blocks whole
    (every other block checkpointed) or a share of them whole (blocks); the recomputed matmuls' share of the block plus its
    pointwise work (op-level policy)."""
    policy = r.ov.selective_recompute
    if policy in ("every_other_block", "blocks"):
        return lt.forward_s * checkpointed_fraction(policy, r.ov.checkpointed_block_fraction)
    if policy == "op_policy":
        return op_policy_recompute_share(r.model) * (lt.forward_s - lt.attn_core_s)
    return lt.attn_core_s


def _vocab_split(r: _Role) -> int:
    """Ranks the vocabulary is split over for the loss: tp when vocabulary-parallel, else 1
    (gathered logits, the whole loss on every rank)."""
    return r.lay.tp if r.ov.vocab_parallel_loss else 1


def _tensor_parallel(r: _Role, st: _Stage) -> tuple[float, float, float]:
    """(forward, backward) seconds per micro-batch of the tensor-parallel collectives, and their
    bytes per step over all GPUs. Megatron: 2 all-reduces of b*s*h per block forward, 2 backward,
    2 more when full recomputation repeats the forward; the embedding adds one. Without a
    vocabulary-parallel loss the logits are all-gathered in the forward."""
    lay, n_l = r.lay, st.n_layers
    tp, dp, m = lay.tp, lay.dp, r.m
    if tp == 1:  # no tensor-parallel group: nothing to reduce or gather
        return 0.0, 0.0, 0.0
    tp_bytes = r.sbh * r.q
    ar = comm.allreduce_time(st.node, tp_bytes, tp, 1)
    n_ar_f = 2 * n_l + (1 if st.first else 0)
    n_ar_b = (2 * n_l + (2 * n_l if r.recompute == "full" else 0) + (1 if st.last else 0)) if r.train else 0
    tp_f, tp_b = n_ar_f * ar, n_ar_b * ar
    if r.ov.overlap_tp_comm and n_l:
        # Overheads.overlap_tp_comm: chunked under the block's GEMMs (its work less the attention
        # core); at least one chunk of tp shows
        lt = _layer_time(r.problem, r.model, st.gpu, r.problem.job.precision, lay.micro_batch, r.problem.job.seq_len,
                         tp, fused_attention(r.ov, r.model), r.gemm or r.train_gemm, lay.ep, lay.cp,
                         train_fp8=r.train_gemm is not None)
        gemm_f = lt.device_forward_s - lt.attn_core_s
        tp_f = sum(max(c / tp, c - hide) for c, hide in ((n_ar_f * ar, n_l * gemm_f),))
        if r.train:
            tp_b = max(tp_b / tp, tp_b - n_l * 2 * gemm_f * (2 if r.recompute == "full" else 1))
    total = 0.0
    if tp > 1:
        total += (n_ar_f + n_ar_b) * 2 * (tp - 1) / tp * tp_bytes * tp * dp * lay.cp * m
        if st.last and not r.ov.vocab_parallel_loss:
            logits = lay.micro_batch * r.s_loc * r.model.vocab_size * r.q
            tp_f += comm.allgather_time(st.node, logits, tp, 1)
            total += (tp - 1) / tp * logits * tp * dp * lay.cp * m
    return tp_f, tp_b, total


def _expert_alltoall(r: _Role, st: _Stage) -> tuple[float, float]:
    """Expert parallelism: (seconds per micro-batch, bytes per step over all GPUs) of the two
    all-to-alls (dispatch, combine) of each MoE block of the stage, among the ep ranks of a group
    (consecutive dp ranks, tp global ranks apart: comm.alltoall_time prices the link tier it
    spans). Each rank sends (ep-1)/ep of its buffer; the forward waits for both."""
    ep = r.lay.ep
    if ep == 1 or not st.moe_layers:
        return 0.0, 0.0
    n = 2 * st.moe_layers
    one = comm.alltoall_time(st.node, r.expert_a2a_bytes, ep, r.lay.tp)
    wire = n * (ep - 1) / ep * r.expert_a2a_bytes * r.lay.tp * r.lay.dp * r.m
    return n * one, wire


def _ring_attention(r: _Role, st: _Stage) -> tuple[float, float, float]:
    """Context parallelism (ring attention, zigzag; zhuzilin/ring-flash-attention as EasyContext
    runs it): (exposed forward seconds, exposed backward seconds per micro-batch, bytes per step
    over all GPUs) of the K/V blocks travelling around the ring of cp ranks (tp apart:
    comm.ring_exchange_time prices the link, NVLink inside a node).

    Per block and micro-batch each rank holds K and V of its b*s/cp tokens (2*g*d/tp wide, q
    bytes). Forward: cp - 1 steps, each sending the current K/V block on while the attention
    kernel runs on it, so a step takes max(compute, transfer) and only a transfer that outlasts
    the step's attention compute (1/cp of the block's attention core, lt.attn_core_s) is exposed.
    Backward: the K/V blocks travel again (cp - 1 steps) together with the dK/dV accumulators
    (fp32, RING_GRAD_BYTES), each step overlapping twice the forward step's attention compute;
    the last dK/dV send returns them to their owner after the last step: exposed. A recomputed
    forward (full recompute, or a selective policy that recomputes the attention core) runs
    the forward ring again in the backward."""
    lay, cp = r.lay, r.lay.cp
    if cp == 1:
        return 0.0, 0.0, 0.0
    model, n, p = r.model, st.n_layers, r.problem
    lt = _layer_time(p, model, st.gpu, p.job.precision, lay.micro_batch, p.job.seq_len, lay.tp,
                     fused_attention(r.ov, model), r.gemm, lay.ep, cp)
    kv_elems = lay.micro_batch * r.s_loc * 2 * model.num_kv_heads * model.head_dim / lay.tp
    kv, dkv = kv_elems * r.q, kv_elems * RING_GRAD_BYTES
    step = lt.attn_core_s / cp
    t_kv = comm.ring_exchange_time(st.node, kv, cp, lay.tp)
    fwd = n * (cp - 1) * max(0.0, t_kv - step)
    sent = n * (cp - 1) * kv
    bwd = 0.0
    if r.train:
        bwd = n * ((cp - 1) * max(0.0, comm.ring_exchange_time(st.node, kv + dkv, cp, lay.tp) - 2 * step)
                   + comm.ring_exchange_time(st.node, dkv, cp, lay.tp))
        sent += n * ((cp - 1) * kv + cp * dkv)
        again = {"full": 1.0}.get(r.recompute, 0.0)
        if r.recompute == "selective":
            policy = r.ov.selective_recompute
            again = (checkpointed_fraction(policy, r.ov.checkpointed_block_fraction)
                     if policy in ("every_other_block", "blocks") else 0.0 if policy == "op_policy" else 1.0)
        bwd += again * fwd
        sent += again * n * (cp - 1) * kv
    return fwd, bwd, sent * lay.stage_gpus * r.m


def _pipeline_sends(r: _Role, st: _Stage, groups: tuple[int, ...]) -> tuple[float, int, float]:
    """(one send's seconds, sends per micro-batch, bytes per step) between pipeline stages. Each of
    v chunks sends forward and, training, back; the model's last chunk sends nothing forward and
    its first nothing back. Neighbour stages are tp*dp ranks apart; a stage in another group
    (mixed cluster) is on another node, reached at the slower of the two nodes' network rates."""
    lay, cl = r.lay, r.problem.cluster
    tp, pp, dp, v = lay.tp, lay.pp, lay.dp, lay.virtual_stages
    if pp == 1:
        return 0.0, 0, 0.0
    p2p_bytes = r.sbh * r.q / (tp if (lay.sequence_parallel or r.ov.p2p_scatter_gather) else 1)
    i = st.index
    j = min(i + 1, pp - 1)
    if groups[j] == groups[i]:
        one = comm.p2p_time(st.node, p2p_bytes, lay.stage_gpus, nodes=-(-lay.gpus // st.node.gpus_per_node))
    else:
        other = cl.groups[groups[j]].node
        slow = min((st.node, other), key=lambda nd: nd.inter_node.bandwidth_gb_per_s * nd.inter_node.efficiency)
        one = comm.link_time(slow.inter_node, p2p_bytes, op="send_recv")
    sends = (v - (1 if st.last else 0)) + ((v - (1 if st.first else 0)) if r.train else 0)
    return one, sends, sends * p2p_bytes * lay.stage_gpus * r.m


def overlapped_layer_s(compute: float, comm: float, slowdown: float) -> float:
    """Seconds of one layer whose ``compute`` runs under a ``comm``-second collective (the next
    layer's prefetched all-gather, this layer's reduce-scatter). The collective's kernels take SMs
    and HBM bandwidth only while they run (Overheads.overlap_slowdown: compute at 1/slowdown of
    its rate during them; Galvatron's 1.1-1.3 is measured over the overlapped span), so the
    compute slows for the collective's g seconds, not for the whole layer: a collective that ends
    first leaves g + (c - g / slowdown) = c + g (1 - 1/slowdown); one that outlasts the slowed
    compute (g >= c * slowdown) leaves g. Slowing the whole compute instead charged a 700K-token
    ring-attention step (EasyContext: 17 s of compute per block under a 10 ms gather) 10%."""
    if comm >= compute * slowdown:
        return comm
    return compute + comm * (1.0 - 1.0 / slowdown)


def _zero3_gathers(r: _Role, st: _Stage, fwd: float, bwd: float) -> tuple[float, float, float]:
    """ZeRO-3 / FSDP: (exposed seconds per micro-batch, parameter bytes, gradient bytes per step).

    Prefetch, layer by layer (FSDP's forward and backward prefetch, DeepSpeed's prefetch bucket):
    the next layer's all-gather runs under this layer's compute, and in the backward the previous
    layer's all-gather plus this layer's reduce-scatter run under its backward. Only the first
    gather of each pass, the last reduce-scatter, and whatever communication outlasts a layer's
    compute are exposed; the compute a collective overlaps slows by ``overlap_slowdown`` while the
    collective runs (overlapped_layer_s). For n layers of compute c and communication g per layer,
    a pass takes g + (n - 1) * overlapped_layer_s(c, g) + c. One collective per layer over the
    whole shard group, at the rate the runtime's collectives get across nodes (_zero3_collective:
    all of a node's NICs for PyTorch FSDP, each GPU's own NIC share for DeepSpeed ZeRO-3).

    Hybrid sharding (``Layout.shard_group`` < dp, HSDP): the gathers and reduce-scatters run
    inside the shard group (``shard`` consecutive dp ranks, tp*shard GPUs: one node's NVLink
    when they fit in it), and each layer's gradient shard (1/shard of its gradients) is then
    all-reduced across the ``replicas`` groups holding the same shard (ranks tp*shard apart:
    the inter-node link), in the backward's per-layer communication. Context parallelism: the cp
    ranks of a dp rank hold the same weights, so the shard group is shard * cp ranks
    (Layout.state_shards)."""
    lay = r.lay
    dp, tp, m = lay.dp, lay.tp, r.m
    shard, replicas = lay.state_shards, lay.replicas
    ranks = lay.stage_gpus  # GPUs of the stage, every one of which gathers
    if lay.zero < 3 or dp * lay.cp == 1:
        return 0.0, 0.0, 0.0
    # A block's weights are gathered for its forward and for its backward, and again for a full
    # recomputation where the runtime releases them after each forward (Overheads.zero3_runtime
    # "deepspeed"); FSDP recomputes on the weights gathered for the backward.
    regather = r.recompute == "full" and r.ov.zero3_runtime == "deepspeed"
    passes = (2 + (1 if regather else 0)) if r.train else 1
    n = max(st.n_layers, 1)
    slow = r.ov.overlap_slowdown
    gather = _zero3_collective(r, st.node, st.weight_bytes, shard, tp) / n  # one layer, one pass

    def one_pass(compute: float, comm_layer: float, tail: float = 0.0) -> float:
        c = compute / n
        return comm_layer - tail + (n - 1) * overlapped_layer_s(c, comm_layer, slow) + c + tail

    exposed = one_pass(fwd, gather) - fwd
    if r.train:
        scatter = _zero3_collective(r, st.node, st.params * r.q, shard, tp, op="reduce_scatter") / n
        scatter += comm.allreduce_time(st.node, st.params * r.q / shard, replicas, tp * shard) / n
        back_gathers = gather * (passes - 1)  # the backward's gather (and a recompute's own)
        exposed += one_pass(bwd, back_gathers + scatter, tail=scatter) - bwd
    param_bytes = passes * (shard - 1) / shard * st.weight_bytes * ranks * m
    grad_bytes = 0.0
    if r.train:
        grad_bytes = ((shard - 1) / shard * st.params * r.q
                      + 2 * (replicas - 1) / replicas * st.params * r.q / shard) * ranks * m
    return exposed, param_bytes, grad_bytes


def _zero3_collective(r: _Role, node: NodeSpec, nbytes: float, shard: int, tp: int, op: str = "all_gather") -> float:
    """One ZeRO-3 all-gather (or reduce-scatter) of ``nbytes`` over the shard group, by runtime
    (Overheads.zero3_runtime). ``fsdp`` (PyTorch FSDP1/FSDP2: one all_gather_into_tensor /
    reduce_scatter_tensor per unit on NCCL): NCCL's rings enter each node once per channel and
    spread the channels over the node's NICs, so a node's NICs together carry (n-1)/n of the
    buffer and NVLink the rest (comm.allgather_time). fms-fsdp's 70B step on 128 A100 (22.1 s at
    a 400 Gb/s node network, FMS-T2-A100-04) could not run at the flat rate: 3 x 140 GB through
    one 6.25 GB/s NIC share per GPU is 79 s. ``deepspeed`` (DeepSpeed ZeRO-3, per-module
    fetches): one flat ring at each GPU's own NIC share (comm.flat_allgather_time; Narayanan et
    al. 2021 Table 2: the 175B ZeRO-3 step is flat at 66.75 s from 768 to 1536 GPUs, 3 x 350 GB
    at about 16 GB/s per GPU)."""
    if r.ov.zero3_runtime == "fsdp":
        return comm.allgather_time(node, nbytes, shard, tp, op=op)
    return comm.flat_allgather_time(node, nbytes, shard, tp, op=op)


def _host_link(r: _Role, st: _Stage):
    """The host link of one of the stage's GPUs while all of them on its node copy at once (the
    stage's tp x dp x cp ranks stream in lockstep; comm.host_link splits a shared uplink)."""
    return comm.host_link(st.node, r.lay.stage_gpus)


def _weight_streaming(r: _Role, st: _Stage, fwd: float) -> tuple[float, float]:
    """Offloaded (teacher) weights streamed from the host once per micro-batch, prefetched behind
    the forward: (exposed seconds per micro-batch, bytes per step)."""
    if r.lay.offload != "weights":
        return 0.0, 0.0
    stream = comm.link_time(_host_link(r, st), st.weight_bytes, messages=st.n_layers)
    return max(0.0, stream - fwd), st.weight_bytes * r.lay.stage_gpus * r.m


def _gradient_reduction(r: _Role, st: _Stage, bwd: float) -> tuple[float, float, float]:
    """Data-parallel gradient reduction of ZeRO 0-2 per step: (its whole time, the part the
    backward and the next forward do not hide, bytes). ZeRO-0 all-reduces the gradients; ZeRO-1/2
    reduce-scatter them and all-gather the updated weights after the optimizer step; 8-bit
    gradients add a memory-bound quantize + dequantize. Each runs in the runtime's buckets
    (Overheads.grad_bucket_mib), every call paying the collective's latency. Overlapped
    (Overheads.overlap_grad_reduce): buckets of 1/n_l of the gradients, each ready as its layer's
    backward ends; the last one always follows the backward, the rest hide while the link keeps
    up. The weights' all-gather needs the updated weights, so it never hides under the backward:
    exposed, or (Overheads.overlap_param_gather) all but one layer's share under the next forward.
    Under interleaved 1F1B the window is the last group of pp micro-batches' backward less its
    first chunk's share. Hybrid sharding (shard_group < dp): reduce-scatter and all-gather inside the shard group, the
    gradient shard all-reduced across the replicas between them."""
    lay, node = r.lay, st.node
    # Context parallelism: the cp ranks of each dp rank hold the same weights (their gradients are
    # partial sums over their tokens), so the reduction spans dp * cp ranks, tp apart.
    dp, tp = lay.dp * lay.cp, lay.tp
    shard, replicas = lay.state_shards, lay.replicas
    if not r.train or dp == 1 or lay.zero >= 3:
        return 0.0, 0.0, 0.0
    grads = st.params * r.grad_comm_bytes
    bucket = r.ov.grad_bucket_mib * 2**20 if r.ov.grad_bucket_mib else None
    t_params = 0.0
    if lay.zero >= 1:
        t_grads = comm.bucketed(lambda x: comm.reduce_scatter_time(node, x, shard, tp), grads, bucket)
        t_grads += comm.bucketed(lambda x: comm.allreduce_time(node, x, replicas, tp * shard), grads / shard,
                                 bucket / shard if bucket else None)
        if r.ov.zero1_param_sync == "broadcast":
            # Whole tensors are dealt to the shard's ranks (largest first, to the least loaded), so
            # at most one broadcast per parameter tensor: min(shard, tensors) rings through the group.
            calls = min(shard, parameter_tensors(r.model, st.n_layers, first=st.first, last=st.last))
            t_params = calls * comm.broadcast_time(node, st.weight_bytes / calls, shard, tp)
        else:
            t_params = comm.bucketed(lambda x: comm.allgather_time(node, x, shard, tp), st.weight_bytes, bucket)
    else:
        t_grads = comm.bucketed(lambda x: comm.allreduce_time(node, x, dp, tp), grads, bucket)
        # DDP's reducer around the all-reduce (bucket copies, comm hook): part of the synchronisation
        t_grads += ddp_sync_s(r.ov.framework, st.params * FP32_GRAD_BYTES)
    if lay.grad_compression == "int8":
        t_grads += st.params * 10 / (st.gpu.memory_bandwidth_gb_per_s * 1e9)
    n_l = max(st.n_layers, 1)
    overlap = r.ov.overlap_grad_reduce
    window = bwd * (1 - 1 / n_l) if overlap else 0.0
    v = lay.virtual_stages
    if overlap and v > 1:
        # Interleaved 1F1B runs the backward in groups of pp micro-batches, chunk v-1 first down to
        # chunk 0 (Megatron-Core schedules.py): in the last group each chunk's gradients are final
        # once its pp backwards are done, so chunk v-1's reduce can start (v-1)/v of the way before
        # the group's pp micro-batch backwards end (buckets per model chunk, overlap_grad_reduce).
        window = max(window, bwd * min(r.m, lay.pp) * (1 - 1 / v))
    tail = t_grads / n_l if overlap else t_grads
    exposed = max(tail, t_grads - window)
    exposed += t_params / n_l if r.ov.overlap_param_gather else t_params
    if lay.zero >= 1:
        wire = ((shard - 1) / shard * (grads + st.weight_bytes) + 2 * (replicas - 1) / replicas * grads / shard) * tp * dp
    else:
        wire = (dp - 1) / dp * 2 * grads * tp * dp
    return t_grads + t_params, exposed, wire


def _optimizer_step(r: _Role, st: _Stage) -> tuple[float, float]:
    """(seconds, host bytes) of one GPU's optimizer step over its (ZeRO-1+: dp-sharded)
    parameters: on the GPU (memory bound), or offloaded: gradients down and weights up over PCIe
    plus the host's Adam at its measured rate."""
    if not r.train:
        return 0.0, 0.0
    lay = r.lay
    local = st.params / (lay.state_shards if lay.zero >= 1 else 1)
    if lay.offload == "optimizer":
        moved = local * (r.grad_comm_bytes + r.q)
        secs = comm.link_time(_host_link(r, st), moved) + local * 30.0 / (r.ov.host_optimizer_gb_per_s * 1e9)
        return secs, moved * lay.stage_gpus
    fixed = optimizer_overhead_s(r.ov.framework, parameter_tensors(r.model, st.n_layers, first=st.first, last=st.last))
    return optimizer_time(st.gpu, local, r.ov.optimizer_bytes_per_s_fraction) + fixed, 0.0


def recomputed_block_peak_bytes(recomputed: float, logits: float, *, schedule: str, v: int) -> float:
    """Bytes a recomputed block's working set (``recomputed``: one block's activations, rebuilt in
    the backward under full or block-wise recomputation) adds to a stage's peak beyond its stored
    checkpoints, given the ``logits`` (and the loss's fp32 copies) the stage holds at the end of
    a micro-batch's forward. The two are live at different times where each micro-batch's backward
    follows its own forward on the stage (no pipeline, or 1F1B without interleaving): the loss's
    backward and the vocabulary projection's free the logits before the last block is recomputed,
    so the peak is the larger of the two, and the block adds only what it exceeds the logits by.
    GPipe (every forward first) and interleaved 1F1B (another chunk's backward runs while a
    micro-batch's logits wait for theirs) hold both. At 700K tokens over 8 ring ranks (EasyContext,
    Llama-2-7B) the block is 16.2 GiB and the logits 16.0: summing them priced a run that ran on
    80 GB A100s at 87.7 GiB."""
    if schedule == "gpipe" or v > 1:
        return recomputed
    return max(0.0, recomputed - logits)


def _stage_memory(r: _Role, st: _Stage, schedule: str, kd_bytes: float, kd: str | None = None) -> dict[str, float]:
    """Bytes on one GPU of the stage, by term: model states (ZeRO-sharded; a forward-only role
    holds weights only, or two streamed blocks when offloaded), activations of the micro-batches
    in flight (a forward-only role: one block's working set plus the inputs in flight), a gathered
    ZeRO-3 block, logits and KD buffers on the last stage, then fragmentation and the runtime."""
    lay, ov, model = r.lay, r.ov, r.model
    pp, m, v = lay.pp, r.m, lay.virtual_stages
    terms: dict[str, float] = {}
    if r.train:
        st_bytes = model_state_bytes(st.params, dp=lay.state_shards, zero=lay.zero, weight_bytes=r.q,
                                     grad_bytes=(4 if (ov.fp32_main_grads and r.q == 2) else r.q),
                                     optimizer_bytes=(12 if r.q == 2 else 8))
        if lay.offload == "optimizer":
            st_bytes["optimizer"] = 0.0
        elif ov.optimizer_step_bytes:
            st_bytes["optimizer_step"] = optimizer_step_bytes(st.params, shard=lay.state_shards, zero=lay.zero,
                                                              per_param=ov.optimizer_step_bytes)
        terms.update(st_bytes)
        if lay.zero >= 3:
            layer = r.layer_params / lay.tp
            if ov.zero3_runtime == "fsdp":
                # FSDP at the start of the backward: the block in use and the one prefetched
                # (formulas.md: typically 2 layers) or, on a stage holding the embeddings (the
                # root unit), those with the block in use; plus one unit's unsharded gradients
                # before their reduce-scatter.
                root = st.params - st.n_layers * layer
                terms["gathered_params"] = max(2 * layer, root + layer) * r.q
                terms["unsharded_grads"] = max(layer, root) * r.q
            else:  # DeepSpeed: per-module fetch, about one block live
                terms["gathered_params"] = layer * r.q
        held = in_flight(schedule, stage=st.index, pp=pp, m=m, v=v)
        terms["activations"] = st.n_layers * r.act_layer * held
        if r.train_gemm == "fp8":  # kdplan.cost.fp8: Transformer Engine's fp8 weight cache and fp8-saved inputs
            terms["fp8_weights"] = fp8_weight_cache_bytes(model, n_layers=st.n_layers, tp=lay.tp, zero=lay.zero,
                                                          fp8_params=r.fp8_params)
            if r.fp8_params:  # the weights themselves in fp8 (ZeRO-3: the weights' shard)
                terms["weights"] -= (fp8_param_saving(model, n_layers=st.n_layers, tp=lay.tp, q=r.q)
                                     / (lay.state_shards if lay.zero >= 3 else 1))
            terms["activations"] -= st.n_layers * r.fp8_act_saving * held
        recomputed = 0.0
        if r.recompute == "full" or (r.recompute == "selective" and ov.selective_recompute in ("every_other_block", "blocks")):
            recomputed = r.full_layer  # one block recomputed in backward
    else:
        w = st.weight_bytes / (lay.state_shards if lay.zero >= 3 else 1)
        if lay.offload == "weights":
            w = 2 * r.block_bytes  # double-buffered streamed blocks
        terms["weights"] = w
        terms["activations"] = r.full_layer + r.sbh * r.q * min(pp - st.index, m)
        if st.moe_layers and r.expert_a2a_bytes:  # expert parallelism: the dispatched tokens sent and received
            terms["expert_dispatch"] = 2 * r.expert_a2a_bytes
    if st.last:
        terms["logits"] = logits_bytes(model, b=lay.micro_batch, s=r.s_loc, tp=_vocab_split(r), q=r.q,
                                       fp32_copies=ov.loss_fp32_logit_copies if r.train else 1)
        if kd_bytes:
            terms["kd_buffers"] = kd_bytes
        if r.train:  # a CPU's host heap kept by the loss beyond the logits and buffers counted (measured)
            heap = loss_heap_bytes(st.gpu, lay.micro_batch * r.s_loc * model.vocab_size / _vocab_split(r), kd)
            if heap > terms["logits"] + terms.get("kd_buffers", 0.0):
                terms["loss_heap"] = heap - terms["logits"] - terms.get("kd_buffers", 0.0)
    if r.train:
        terms["activations"] += recomputed_block_peak_bytes(recomputed, terms.get("logits", 0.0), schedule=schedule, v=v)
    # The caching allocator fragments around what is allocated and freed every step (activations,
    # logits, gathered blocks, the optimizer step's copies); the model states are a few large
    # buffers allocated once. The measured loss heap is a high-water mark: its fragmentation is in it.
    transient = sum(x for k, x in terms.items() if k not in PERSISTENT_TERMS and k != "loss_heap")
    terms["fragmentation"] = transient * ov.fragmentation_fraction
    terms["framework"] = ov.framework_memory_gib * GIB
    return terms


def _stages(r: _Role, layers: tuple[int, ...], groups: tuple[int, ...]) -> list[_Stage]:
    """Each pipeline stage's GPU: tp-sharded blocks, vocabulary-parallel embeddings on the first
    (input) and last (output, unless tied on a single stage) stages."""
    model, lay, cl = r.model, r.lay, r.problem.cluster
    h, V, tp, pp = model.hidden_size, model.vocab_size, lay.tp, lay.pp
    emb_in = V * h / tp + (model.max_positions * h if model.learned_positions else 0)
    emb_out = V * h / tp if (not model.tied_embeddings or pp > 1) else 0.0
    dense_first = model.num_layers - model.moe_layers  # MoE blocks follow the leading dense ones
    out = []
    for i in range(pp):
        lo = sum(layers[:i])
        moe_here = max(0, lo + layers[i] - max(lo, dense_first))
        first, last = i == 0, i == pp - 1
        emb = (emb_in if first else 0) + (emb_out if last else 0)
        params = layers[i] * r.layer_params / tp + emb
        wbytes = params * r.q if r.gemm is None else layers[i] * r.block_bytes + emb * r.q
        if r.fp8_params:  # Overheads.fp8_params: the block Linear weights held and moved at 1 byte
            wbytes -= fp8_param_saving(model, n_layers=layers[i], tp=tp, q=r.q)
        out.append(_Stage(index=i, n_layers=layers[i], moe_layers=moe_here, first=first, last=last, gpu=cl.gpu_of_group(groups[i]),
                          node=cl.groups[groups[i]].node, params=params, weight_bytes=wbytes))
    return out


def price_role(problem: Problem, model: ModelSpec, lay: Layout, *, role: str, train: bool,
               group: int = 0, stage_layers: tuple[int, ...] | None = None,
               stage_groups: tuple[int, ...] | None = None, kd_bytes: float = 0.0,
               kd: str | None = None, topk: int = 0) -> RolePrice:
    """The cost of one role per optimizer step (see the module docstring). ``kd`` is the teacher
    outputs' compression kind ("dense" | "topk") when the role's loss involves them (compute.loss_passes);
    ``topk`` its k (the teacher's top-k encoding is priced per k by the device profile).

    Per stage, one function per cost term: _stage_compute, _framework, _tensor_parallel, _pipeline_sends,
    _zero3_gathers, _weight_streaming, _gradient_reduction, _optimizer_step, _stage_memory; here
    they are combined into the pipeline formula and the step."""
    why = _check(problem, model, lay, role, stage_layers)
    if why:
        return _invalid(role, why)
    job, ov = problem.job, problem.cluster.overheads
    B, s, q = job.global_batch, job.seq_len, PRECISION_BYTES[job.precision]
    tp, pp, dp, b, v = lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.virtual_stages
    m = B // (dp * b)
    if v > 1 and m % pp:
        return _invalid(role, f"interleaved 1F1B needs micro-batches per pipeline ({m}) divisible by pp={pp}")
    # Virtual stages imply the interleaved schedule (Megatron); GPipe and 1F1B share the bubble.
    schedule = "interleaved_1f1b" if v > 1 else ("gpipe" if lay.schedule == "gpipe" else "1f1b")
    layers = stage_layers or split_layers(model.num_layers, pp)
    groups = stage_groups or (group,) * pp
    recompute = lay.recompute if train else "none"
    # A quantized forward-only teacher (Layout.forward_precision): low-precision block GEMMs and
    # 1-byte block weights; the student always trains at the job's precision.
    fprec = lay.forward_precision if role == "teacher" else "bf16"
    ep = lay.ep
    s_loc = s // lay.cp  # this rank's tokens of each sequence (context parallelism)
    act = dict(b=b, s=s_loc, tp=tp, sequence_parallel=lay.sequence_parallel, q=q, flash=fused_attention(ov, model),
               selective=ov.selective_recompute, eager=ov.block_ops == "eager",
               block_fraction=ov.checkpointed_block_fraction)
    r = _Role(problem=problem, model=model, lay=lay, role=role, train=train, q=q, m=m, recompute=recompute,
              gemm=None if fprec == "bf16" else fprec,
              train_gemm="fp8" if (train and lay.train_precision == "fp8") else None,
              fp8_params=bool(train and lay.train_precision == "fp8" and ov.fp8_params),
              fp8_act_saving=fp8_saved_input_saving(model, recompute=recompute, selective=ov.selective_recompute,
                                                    b=b, s=s_loc, tp=tp, sequence_parallel=lay.sequence_parallel, q=q,
                                                    block_fraction=ov.checkpointed_block_fraction)
              if (train and lay.train_precision == "fp8") else 0.0,
              block_bytes=block_weight_bytes(model, tp, q, fprec, ep),
              act_layer=activation_bytes_per_layer(model, recompute=recompute, **act),
              full_layer=activation_bytes_per_layer(model, recompute="none", **act),
              grad_comm_bytes=1.0 if lay.grad_compression == "int8" else ov.grad_comm_bytes, ov=ov, sbh=b * s_loc * model.hidden_size, s_loc=s_loc,
              layer_params=rank_layer_params(model, ep),
              expert_a2a_bytes=expert_alltoall_bytes(model, b=b, s=s_loc, tp=tp, q=q, imbalance=ov.expert_load_imbalance)
              if ep > 1 else 0.0)

    stages: list[StageTime] = []
    per_mb: list[float] = []
    comp_mb: list[float] = []
    loss_mb: list[float] = []
    fw_mb: list[float] = []
    mems: list[tuple[float, dict[str, float]]] = []
    bytes_by_kind = {"tensor_parallel": 0.0, "pipeline": 0.0, "gradients": 0.0, "params": 0.0, "offload": 0.0,
                     "expert_parallel": 0.0, "context_parallel": 0.0}
    tp_s = p2p_s = ep_s = cp_s = dp_exposed = zero3_exposed = offload_exposed = opt_s = 0.0
    for st in _stages(r, layers, groups):
        fwd, bwd, loss = _stage_compute(r, st, kd, topk)
        fx_f, fx_b = _framework(r, st)
        fwd, bwd = fwd + fx_f, bwd + fx_b
        tp_f, tp_b, tp_bytes = _tensor_parallel(r, st)
        a2a, a2a_bytes = _expert_alltoall(r, st)
        cp_f, cp_b, cp_bytes = _ring_attention(r, st)
        one, sends, pp_bytes = _pipeline_sends(r, st, groups)
        p2p = sends * one
        if ov.overlap_p2p_comm and v > 1 and sends:
            # Overheads.overlap_p2p_comm: each send under the next chunk pass (2v passes per micro-batch)
            p2p = sends * max(0.0, one - (fwd + bwd) / (2 * v if train else v))
        z3, z3_params, z3_grads = _zero3_gathers(r, st, fwd, bwd)
        off, off_bytes = _weight_streaming(r, st, fwd)
        t_dp, dp_exp, dp_bytes = _gradient_reduction(r, st, bwd)
        opt_i, opt_bytes = _optimizer_step(r, st)
        bytes_by_kind["tensor_parallel"] += tp_bytes
        bytes_by_kind["expert_parallel"] += a2a_bytes
        bytes_by_kind["context_parallel"] += cp_bytes
        bytes_by_kind["pipeline"] += pp_bytes
        bytes_by_kind["params"] += z3_params
        bytes_by_kind["gradients"] += z3_grads + dp_bytes
        bytes_by_kind["offload"] += off_bytes + opt_bytes
        dp_exposed = max(dp_exposed, dp_exp)
        opt_s = max(opt_s, opt_i)

        t_f = fwd + tp_f + a2a + cp_f + (p2p / 2 if train else p2p)
        t_b = bwd + tp_b + cp_b + (p2p / 2 if train else 0.0)
        per_mb.append(t_f + t_b + z3 + off)
        comp_mb.append(fwd + bwd)
        loss_mb.append(loss)
        fw_mb.append(fx_f + fx_b)
        if st.index == 0 or per_mb[-1] >= max(per_mb[:-1]):
            tp_s, p2p_s, ep_s, cp_s = tp_f + tp_b, p2p, a2a, cp_f + cp_b
            zero3_exposed, offload_exposed = z3, off

        terms = _stage_memory(r, st, schedule, kd_bytes, kd)
        mem = sum(terms.values())
        mems.append((mem, terms))
        stages.append(StageTime(forward_s=t_f, backward_s=t_b, p2p_s=one, memory_gib=mem / GIB,
                                busy_forward_s=fwd + tp_f + a2a + cp_f, busy_backward_s=bwd + tp_b + cp_b,
                                tp_s=tp_f + tp_b,
                                sends=sends, grad_reduce_s=t_dp, params_s=z3, offload_s=off, loss_s=loss))

    t_max = max(per_mb)
    bubble = (sum(per_mb) - t_max) / v
    pipe = m * t_max + bubble
    # Compute on the critical path: the slowest stage's busy compute over the step.
    slow = per_mb.index(t_max)
    exposed = {"tensor_parallel": m * tp_s, "pipeline": m * p2p_s, "gradients": dp_exposed,
               "params": m * zero3_exposed, "expert_parallel": m * ep_s, "context_parallel": m * cp_s}
    fi = max(range(pp), key=lambda j: mems[j][0])
    mem, terms = mems[fi]
    gpu0 = problem.cluster.gpu_of_group(groups[fi])
    fits = mem <= gpu0.memory_gib * GIB
    out_why = ""
    if not fits:
        big = max((k for k in terms if k not in ("framework", "fragmentation")), key=terms.get)
        out_why = (f"micro-batch {b} still needs {mem / GIB:.1f} GiB on {role} pipeline stage {fi} "
                   f"(largest: {big} {terms[big] / GIB:.1f} GiB) > {gpu0.name} {gpu0.memory_gib:g} GiB")
    mf = train_model_flops(model, sequences=B, s=s) if train else forward_flops(model, b=B, s=s)
    return RolePrice(
        role=role, time_s=pipe + dp_exposed + opt_s, compute_s=m * comp_mb[slow], bubble_s=bubble,
        comm_exposed_s={k: x for k, x in exposed.items() if x > 0},
        memory_gib=mem / GIB, memory_terms_gib={k: x / GIB for k, x in terms.items()},
        fullest_stage=fi, bytes_per_step={k: x for k, x in bytes_by_kind.items() if x > 0},
        model_flops=mf, num_micro_batches=m, stages=stages, optimizer_s=opt_s, fits=fits,
        why=out_why, offload_s=m * offload_exposed, loss_s=m * loss_mb[slow], framework_s=m * fw_mb[slow],
    )


def cached_price(problem: Problem, key: tuple, fn) -> RolePrice:
    c = problem.memo().prices
    r = c.get(key)
    if r is None:
        r = c[key] = fn()
    return r


def role_peak(problem: Problem, group: int = 0) -> float:
    return peak_flops(problem.cluster.gpu_of_group(group), problem.job.precision)
