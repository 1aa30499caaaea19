"""Compute time: FLOPs / (peak * eta), eta from the profile's ComputeEfficiency as a function of
each matrix multiply's size and its narrowest dimension (formulas.md section 1, "calibrated
roofline"). Small micro-batches and narrow tensor-parallel shards run below peak because their
matrices are small or skinny, not because of a per-layout constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..schema.cluster import ComputeEfficiency, GPUSpec
from ..schema.model import ModelSpec
from .flops import attention_span_fraction, block_matmuls, layer_flops, logits_flops

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def peak_flops(gpu: GPUSpec, precision: str) -> float:
    """Dense peak in FLOP/s for the compute precision."""
    return {"bf16": gpu.peak.bf16_tflops, "fp16": gpu.peak.fp16_tflops,
            "fp32": gpu.peak.fp32_tflops}[precision] * 1e12


def matmul_efficiency(eff: ComputeEfficiency, flops: float, min_dim: float) -> float:
    """Achieved fraction of peak of one matrix multiply of ``flops`` FLOPs whose narrowest
    dimension is ``min_dim``: max_fraction * F/(F + F_half) * min(1, min_dim / min_dim_saturation)."""
    size = flops / (flops + eff.half_saturation_gflop * 1e9) if flops > 0 else 0.0
    return eff.max_fraction * size * min(1.0, min_dim / eff.min_dim_saturation)


def matmul_time(gpu: GPUSpec, precision: str, m: float, n: float, k: float) -> float:
    """Time of an (m x k) @ (k x n) matmul."""
    flops = 2.0 * m * n * k
    if flops <= 0:
        return 0.0
    return flops / (peak_flops(gpu, precision) * matmul_efficiency(gpu.efficiency, flops, min(m, n, k)))


@dataclass(frozen=True)
class LayerTime:
    """Seconds per micro-batch for one block on one GPU: the device's work (the backward twice the
    forward's), or the host's dispatch of the pass's operators where that is longer (block_ops)."""

    device_forward_s: float  # matmuls + attention core + elementwise
    attn_core_s: float  # the part selective recomputation repeats
    ring_merge_s: float = 0.0  # of device_forward_s: ring attention's output merges (memory bound)
    ring_backward_s: float = 0.0  # ring attention's gradient accumulations in the backward
    forward_floor_s: float = 0.0  # host dispatch of the forward's operators
    backward_floor_s: float = 0.0  # and of the backward's

    @property
    def forward_s(self) -> float:
        return max(self.device_forward_s, self.forward_floor_s)

    @property
    def backward_s(self) -> float:
        """2x the forward's device work, ring attention's merges not doubled (the backward
        accumulates gradients instead: ring_backward_s), or the backward's dispatch floor."""
        return max(2.0 * (self.device_forward_s - self.ring_merge_s) + self.ring_backward_s, self.backward_floor_s)


# Operators one eager block dispatches (every aten call, views included: each costs host time),
# forward with autograd and backward, counted with a TorchDispatchMode on the executor's blocks
# (executor.models.build_model: Hugging Face decoder layers, SDPA; torch 2.13, transformers 5):
# LayerNorm + plain MLP (gpt) 56 / 114; the gated MLP adds 5 / 9 (gate projection, SiLU, product
# and their gradients, averaged over the gpt and llama blocks: +5 / +7 and +5 / +11); RMSNorm
# instead of LayerNorm (llama: upcast, pow, mean, rsqrt, two products, downcast per norm) adds
# 16 / 16. tests/test_dispatch_floor.py recounts them.
BLOCK_OPS_BASE = (56, 114)
BLOCK_OPS_GATED = (5, 9)
BLOCK_OPS_RMSNORM = (16, 16)


def block_ops(model: ModelSpec) -> tuple[int, int]:
    """(forward, backward) operators one block of ``model`` dispatches in the executor (BLOCK_OPS_*).
    A mixture-of-experts block is counted as its dense equivalent (a lower bound: its router and
    per-expert calls add more)."""
    fwd, bwd = BLOCK_OPS_BASE
    if model.gated_mlp:
        fwd, bwd = fwd + BLOCK_OPS_GATED[0], bwd + BLOCK_OPS_GATED[1]
    if model.norm == "rmsnorm":
        fwd, bwd = fwd + BLOCK_OPS_RMSNORM[0], bwd + BLOCK_OPS_RMSNORM[1]
    return fwd, bwd


def dispatch_floor_s(model: ModelSpec, gpu: GPUSpec) -> tuple[float, float]:
    """(forward, backward) seconds the host needs to issue one block's operators on ``gpu``
    (ComputeEfficiency.op_dispatch_us x block_ops): the least either pass can take."""
    us = gpu.efficiency.op_dispatch_us
    if not us:
        return 0.0, 0.0
    fwd, bwd = block_ops(model)
    return fwd * us * 1e-6, bwd * us * 1e-6


SCORE_BYTES_FWD = 9.0  # HBM bytes per attention-score element in an unfused forward


# Elements one fused block reads plus writes per token in its memory-bound kernels (forward), as
# Megatron-LM / Transformer Engine / torch.compile fuse them; the attention core's scale, mask and
# softmax run inside the flash kernel (or SCORE_BYTES_FWD prices them apart), bias adds in the
# GEMM epilogues:
# - two norms (LayerNorm or RMSNorm, one kernel each): read h, write h: 2 x 2h;
# - two residual adds (Megatron's fused bias-dropout-add): read the branch and the residual, write
#   the sum: 2 x 3h;
# - the MLP activation: GELU reads f and writes f (2f); a gated MLP's SiLU-and-product reads the
#   gate and up projections and writes their product (3f);
# - rotary embeddings (no learned positions): read and write q and k, 2 (q + k) per token;
#   per-head q/k norms the same again.
NORM_ELEMENTS = 2 * 2  # x h
RESIDUAL_ELEMENTS = 2 * 3  # x h
ACTIVATION_ELEMENTS = {False: 2, True: 3}  # x f, by gated_mlp


def fused_elementwise_elements(model: ModelSpec) -> float:
    """Elements per token a fused block's forward elementwise kernels read and write, before tensor
    or sequence parallelism splits them (the counts above)."""
    from .memory import active_ffn_width
    h = model.hidden_size
    qk = model.q_width + model.num_kv_heads * model.head_dim
    e = (NORM_ELEMENTS + RESIDUAL_ELEMENTS) * h + ACTIVATION_ELEMENTS[model.gated_mlp] * active_ffn_width(model)
    if not model.learned_positions:
        e += 2 * qk
    if model.qk_norm:
        e += 2 * qk
    return float(e)


def elementwise_s(model: ModelSpec, gpu: GPUSpec, precision: str, *, tokens: float, tp: int,
                  block_gemm_s: float) -> float:
    """Forward seconds of one block's fused elementwise work (norms, activation, residual adds,
    rotary) on ``tokens`` tokens of one of ``tp`` ranks: fused_elementwise_elements x the compute
    dtype's bytes at ``elementwise_bandwidth_fraction`` of the memory bandwidth. Memory bound, so it
    grows with the activations, not the FLOPs: with the shipped profiles it is 1.2% of a Llama-3.1
    405B block's weight GEMMs on an A100 and 8% of a Llama-3.2 1B block's (2.6% and 16% on an H100,
    whose FLOPs outgrow its bandwidth; b = 4, s = 2,048). The price before schema 1.11, a fixed
    ``elementwise_overhead_fraction`` of the weight GEMMs (``block_gemm_s``), is kept for the
    profiles that carry only it; it overpriced large models (fms-fsdp's 70B on A100, 74% of peak
    with recomputation counted: predicted 20% slow) to fit small ones. The attention core does not
    pay it: a fused (flash) kernel does its scale, mask and softmax inside the kernel, and an
    unfused core's score-matrix passes are priced apart (SCORE_BYTES_FWD)."""
    eff = gpu.efficiency
    if eff.elementwise_bandwidth_fraction is None:
        return block_gemm_s * eff.legacy_elementwise_fraction
    return (fused_elementwise_elements(model) * tokens / tp * PRECISION_BYTES.get(precision, 2)
            / (gpu.memory_bandwidth_gb_per_s * 1e9 * eff.elementwise_bandwidth_fraction))


def layer_time(model: ModelSpec, gpu: GPUSpec, precision: str, *, b: int, s: int, tp: int,
               fused_attention: bool = True, gemm_precision: str | None = None, ep: int = 1,
               expert_imbalance: float = 1.0, eager_passes: float = 0.0, cp: int = 1,
               derating: float | None = None) -> LayerTime:
    """Forward time of one block: its four (five gated) matmuls at their own efficiencies, the
    attention core at the profile's attention fraction, plus the fused elementwise work (norms,
    activations, residuals, rotary: elementwise_s, memory bound).

    ``gemm_precision`` ("fp8" | "int8", a quantized forward-only teacher): the four (five)
    weight GEMMs run at that format's peak with the bf16 efficiency curve times the profile's
    ``low_precision_derating`` (``derating``: the runtime's, Overheads.fp8_training_derating, for a
    student trained in fp8); the attention core and the elementwise work stay at
    ``precision``.
    ``ep`` / ``expert_imbalance``: an MoE block's routed experts under expert parallelism
    (flops.block_matmuls). ``eager_passes`` (Overheads.eager_elementwise_passes, op-by-op
    blocks): memory-bound passes over the b*s*(h + f)/tp activations, on top of the fused count.
    ``cp`` (context parallelism, ring attention): the block runs on this rank's b*s/cp tokens;
    its attention core is 1/cp of the whole sequence's (zigzag balances the causal work), run as
    cp flash-attention calls of 1/cp of it each (their size sets the efficiency), plus the ring's
    output merges (ring_merge_s); the K/V transfers are role._ring_attention's.
    Each pass takes at least the host's dispatch of its operators (dispatch_floor_s)."""
    a = model.num_heads
    n = b * s / cp
    d = model.head_dim
    mm = sum(matmul_time(gpu, precision, x.m, x.n, x.k) * x.count
             for part in block_matmuls(model, tokens=n, tp=tp, ep=ep, imbalance=expert_imbalance).values()
             for x in part)
    eff = gpu.efficiency
    core_flops = layer_flops(model, b=b, s=s, tp=tp).attn_core / cp
    # Attention core: one batched (s x d) @ (d x s) product over all local heads (cp calls of
    # 1/cp of this rank's share under ring attention); head_dim is its narrow side.
    core = core_flops / (peak_flops(gpu, precision) * eff.attention_fraction
                         * matmul_efficiency(eff, core_flops / cp, d) / eff.max_fraction)
    merge = ring_merge_s(model, gpu, b=b, s=s, tp=tp, cp=cp)
    ring = dict(ring_merge_s=merge, ring_backward_s=ring_accumulate_s(model, gpu, b=b, s=s, tp=tp, cp=cp))
    core += merge
    if not fused_attention:
        # Unfused kernels read and write the b*a/t*s^2 score matrix in HBM: scale+mask+softmax
        # (read 2 B, write 2 B) and dropout (read 2 B, write 2 B and a 1 B mask) per element.
        core += (b * max(1.0, a / tp) * s * s * attention_span_fraction(model, s) * SCORE_BYTES_FWD
                 / (gpu.memory_bandwidth_gb_per_s * 1e9))
    eager = 0.0
    if eager_passes:
        from .memory import active_ffn_width
        width = model.hidden_size + active_ffn_width(model)
        eager = (eager_passes * n * width / tp * PRECISION_BYTES.get(precision, 2)
                 / (gpu.memory_bandwidth_gb_per_s * 1e9))
    floor_f, floor_b = dispatch_floor_s(model, gpu)
    elementwise = elementwise_s(model, gpu, precision, tokens=n, tp=tp, block_gemm_s=mm) + eager
    if gemm_precision is None:
        return LayerTime(device_forward_s=mm + core + elementwise,
                         attn_core_s=core, forward_floor_s=floor_f, backward_floor_s=floor_b, **ring)
    from ..teacher_precision import low_precision_peak_flops
    mm_low = mm * peak_flops(gpu, precision) / (low_precision_peak_flops(gpu, gemm_precision)
                                               * (derating or gpu.peak.low_precision_derating))
    return LayerTime(device_forward_s=mm_low + core + elementwise, attn_core_s=core,
                     forward_floor_s=floor_f, backward_floor_s=floor_b, **ring)


# Ring attention (zhuzilin/ring-flash-attention, which EasyContext runs; zigzag_ring_flash_attn.py):
# after each of the cp - 1 later ring steps the forward merges the step's partial output into the
# running one in fp32 (update_out_and_lse: block_out.to(fp32) reads 2 B and writes 4; out -
# block_out 12; sigmoid(lse diff) * that 8 (the lse terms are 1/d of it); out - that 12): 38 bytes
# per output element; the backward accumulates dq += dq_buffer (fp32 += bf16: 10 B per element)
# and dk, dv the same over the K/V elements. Zigzag: a rank's later steps run either its whole
# query against half the K/V chunk or half its query against the whole chunk, half each on
# average over the ring, so a merge touches 3/4 of the rank's tokens on average.
RING_MERGE_BYTES_FWD = 38.0
RING_ACCUM_BYTES_BWD = 10.0
RING_ZIGZAG_TOUCHED = 0.75
RING_GRAD_BYTES = 4  # dK/dV travel the ring in fp32 in the backward (the library's accumulators)
#
# What EasyContext's error is made of (session 9, main bbb11ab, shipped constants; per step,
# predicted vs measured): 64K data parallel 50.6 vs 51.2 s (-1.3%); the ring rows 64K 7.56 vs 8.38
# (-9.8%), 128K 22.0 vs 30.7 (-28%), 512K 275 vs 246 (+11.9%), 700K 503 vs 447 (+12.5%): too fast
# at short s, too slow at long s. At 512K/700K the attention core is 94%/95% of the priced compute
# (32 x 4 x 1.83 s = 234 s; 436 s) and ZeRO-3's overlap slowdown (role._zero3_gathers: the whole
# compute times 1.1 under a ~10 ms gather) adds 24 s / 44 s, the whole overshoot: without it the
# rows are +2.1% / +2.6%, so the core itself (full-mask FLOPs at attention_fraction 1.0, i.e. a
# causal kernel at 50% of peak over forward, recompute and backward) matches these rows. The
# 128K row cannot be fitted together with the others by any a*s + c*s^2 (64K and 128K alone
# give 458 s at 512K, measured 246): likely the first-5-steps variance the README warns of.
# Tried and not kept:
# - attention_fraction's bound lifted to 2 (the full-mask convention's ceiling for a causal
#   kernel): the fit sends it to 1.628 (a causal core at 81% of peak, above FlashAttention-2's
#   50-73% of A100 peak, Dao 2023 abstract) and EasyContext to 27.9% in-sample: the
#   short-sequence A100 sources use the core as a sink; FA2's backward at 2.5x the forward's
#   FLOPs (flash-attention's benchmark convention) would push the same way.
# - the attention core exempt from the overlap slowdown: EasyContext 6.5% left out, H200 blocks
#   24.7 -> 7.0% left out, but BLOOM 5.7 -> 7.2, OLMo 5.1 -> 6.7, MLPerf v3.1 6.6 -> 7.5,
#   v4.0 12.8 -> 13.6 left out (kdplan validate --leave-one-source-out),
#   and no physics tells a flash kernel from a GEMM under an NCCL collective (both lose SMs).
# - the slowdown lasting only as long as the collective (5b26b7e, reverted 56ac2d2), re-measured
#   on bbb11ab with the shipped constants: EasyContext 9.8%, OLMo 5.1 -> 11.5% in-sample. Kept
#   since schema 1.11 (role.overlapped_layer_s): with the elementwise work priced by its bytes
#   (elementwise_s) OLMo's small-h blocks carry the memory-bound time the whole-compute slowdown
#   stood in for; with one DeepSpeed per-block cost and the A100 attention prior (fit.py) every
#   source's left-out time error is under 10% (README accuracy table).


def ring_merge_s(model: ModelSpec, gpu: GPUSpec, *, b: int, s: int, tp: int, cp: int) -> float:
    """Forward seconds of one block's ring-attention output merges on one rank (memory bound; the
    backward's accumulations are ``ring_accumulate_s``): (cp - 1) merges over 3/4 of the rank's
    b*s/cp tokens x a*d/tp output elements."""
    if cp <= 1:
        return 0.0
    elems = b * s / cp * model.q_width / tp * RING_ZIGZAG_TOUCHED * (cp - 1)
    return elems * RING_MERGE_BYTES_FWD / (gpu.memory_bandwidth_gb_per_s * 1e9)


def ring_accumulate_s(model: ModelSpec, gpu: GPUSpec, *, b: int, s: int, tp: int, cp: int) -> float:
    """Backward seconds of one block's ring-attention gradient accumulations on one rank: dq over
    the query elements and dk, dv over the K/V elements (g*d each), (cp - 1) times on 3/4 of them."""
    if cp <= 1:
        return 0.0
    kv = 2 * model.num_kv_heads * model.head_dim
    elems = b * s / cp * (model.q_width + kv) / tp * RING_ZIGZAG_TOUCHED * (cp - 1)
    return elems * RING_ACCUM_BYTES_BWD / (gpu.memory_bandwidth_gb_per_s * 1e9)


def logits_time(model: ModelSpec, gpu: GPUSpec, precision: str, *, b: int, s: int, tp: int) -> float:
    """Forward time of the vocabulary projection (b*s x h) @ (h x V/tp)."""
    return matmul_time(gpu, precision, b * s, model.vocab_size / tp, model.hidden_size)


def head_elementwise_factor(gpu: GPUSpec) -> float:
    """What the vocabulary head costs over its matmul: 1 (its final norm, 2h elements a token next
    to the matmul's 2hV FLOPs, is left out; the loss over the logits is loss_time's), or, for a
    profile of the older pricing (no elementwise_bandwidth_fraction), 1 + its
    elementwise_overhead_fraction, as it was priced then."""
    eff = gpu.efficiency
    return 1.0 if eff.elementwise_bandwidth_fraction is not None else 1.0 + eff.legacy_elementwise_fraction


# Element passes (one fp32 read or write, 4 B, of a [tokens x V/tp] tensor) of the loss over the
# vocabulary. Memory-bound elementwise work the logits matmul does not include; chunking the
# tokens bounds its memory, not its passes. Counted on PyTorch's kernels (executor/kd/losses.py):
# a log-softmax reads its input three times (max, sum of exp, output) and writes once (4); its
# backward reads the gradient twice and the output once and writes once (4); a scale or copy
# reads and writes (2).
CE_PASSES = 9  # log-softmax 4 + NLL gradient fill 1 + log-softmax backward 4
# KD on top of the CE (the executor's default checkpoints each loss chunk: forward passes twice):
# forward: student log-softmax at T (scale 2 + 4) and the CE forward again under recomputation
# (4 + 6 = 10 recomputed); backward: log-softmax at T 4 + scale 2 + accumulating the two
# gradients into the logits' gradient 3 (9). Top-k adds the tail logsumexp over the complement
# (scatter copy 2 + logsumexp 2 forward, twice; backward 5); dense adds the teacher's log-softmax
# (cast/scale 2 + 4, twice) and the KL terms (probabilities 2, difference 3, product 3, sum 1,
# twice; backward 2).
KD_PASSES = {"topk": 6 + 10 + 9 + 2 * 4 + 5, "dense": 6 + 10 + 9 + 2 * 6 + 2 * 9 + 2}
# A sampled target (sample:N, topk:M+sample:N) gathers the student's log-probs at its N (+ M) ids:
# O(N) per token, no pass over V beyond the student's own log-softmax, CE and backward.
KD_PASSES["sample"] = 6 + 10 + 9
# Teacher side of systematic sampling (per token, over V): softmax at T (scale 2 + 4), the CDF
# (cumsum read + write 2), the last id of non-zero probability (read 1, max 1); the N searches
# are O(N log V). topk:M+sample:N adds the head's top-k (teacher_topk_passes at M). An estimate
# from the algorithm, not a measurement (`kdplan profile` measures top-k only).
SAMPLE_PASSES = 6 + 2 + 2
# Teacher side of top-k compression where the device profile has no measured table
# (GPUSpec.topk_passes): log-softmax at T over its logits (scale 2 + 4) and a radix select over
# fp32 keys with 8-bit digits (PyTorch's multi-block CUDA top-k: 4 counting passes and one gather
# pass, whatever k up to a few thousand). An estimate from the algorithm, not a measurement; on a
# CPU the selection is a partial sort whose cost grows with k, which `kdplan profile` measures.
DEFAULT_TOPK_PASSES = 6 + 5


def nearest_vocab(table: dict, vocab: int):
    """The entry of a per-vocabulary table (GPUSpec.topk_passes, loss_passes, sample_passes)
    measured at the vocabulary nearest ``vocab`` in log V."""
    return table[min(table, key=lambda v: abs(math.log(v / max(vocab, 1))))]


def teacher_topk_passes(gpu: GPUSpec, k: int, vocab: int) -> float:
    """fp32 passes over [tokens x V] of the teacher's top-k encoding at ``k`` on ``gpu``: the
    profile's table measured at the vocabulary nearest ``vocab`` (in log V), interpolated linearly
    in log2 k (flat beyond its ends); DEFAULT_TOPK_PASSES without a table."""
    if not gpu.topk_passes:
        return float(DEFAULT_TOPK_PASSES)
    return log2_interp(nearest_vocab(gpu.topk_passes, vocab), k)


def log2_interp(table: dict, x: float) -> float:
    """A measured table {point: value} at ``x``: linear in log2 of the point between measured
    points, flat beyond the ends."""
    xs = sorted(table)
    if x <= xs[0]:
        return table[xs[0]]
    if x >= xs[-1]:
        return table[xs[-1]]
    hi = next(i for i, p in enumerate(xs) if p >= x)
    x0, x1 = xs[hi - 1], xs[hi]
    w = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
    return table[x0] + w * (table[x1] - table[x0])


def loss_passes(*, train: bool, kd: str | None, gpu: GPUSpec | None = None, k: int = 0, vocab: int = 0) -> float:
    """fp32 element passes over [tokens x V] of one role's loss: the student's CE (+ KD over the
    ``kd`` compression kind, "dense" | "topk" | "sample"); the teacher's encoding (``train=False``:
    top-k at ``k``, or sampled with an exact head of ``k``). Where the ``gpu``'s profile measured
    them at a vocabulary (GPUSpec.loss_passes, sample_passes, topk_passes: the executor's own
    kernels on that device, nearest ``vocab``), the measurement; otherwise the passes counted
    above (CE_PASSES, KD_PASSES, SAMPLE_PASSES, DEFAULT_TOPK_PASSES)."""
    if not train:
        if kd == "sample":  # k is the exact head's M (0: none)
            own = nearest_vocab(gpu.sample_passes, vocab) if gpu is not None and gpu.sample_passes else SAMPLE_PASSES
            return own + (loss_passes(train=False, kd="topk", gpu=gpu, k=k, vocab=vocab) if k else 0)
        if kd != "topk":
            return 0
        return teacher_topk_passes(gpu, k, vocab) if gpu is not None else float(DEFAULT_TOPK_PASSES)
    if gpu is not None and gpu.loss_passes:
        measured = nearest_vocab(gpu.loss_passes, vocab).get(kd or "none")
        if measured is not None:
            return measured
    return CE_PASSES + (KD_PASSES[kd] if kd else 0)


def logit_softcap_passes(model: ModelSpec, *, train: bool) -> int:
    """fp32 element passes over [tokens x V] of final-logit soft-capping, cap * tanh(x / cap)
    (Gemma 2): read and write forward (2); backward reads the gradient and the input and writes
    (3). 0 without soft-capping."""
    if model.final_logit_softcapping is None:
        return 0
    return 5 if train else 2


def loss_time(gpu: GPUSpec, elements: float, passes: int, bandwidth_fraction: float) -> float:
    """Seconds of ``passes`` fp32 passes over ``elements`` at the achieved memory bandwidth. With a
    profiled cache (gpu.cache_mib, a CPU's last-level cache) a tensor of S bytes is served from it
    in the proportion C^2 / (S^2 + C^2), from memory in the rest: small micro-batches' losses run
    at cache speed, large ones at memory speed (kdplan profile measures the loss at several sizes)."""
    bw = gpu.memory_bandwidth_gb_per_s * 1e9
    inv = 1.0 / bw
    if gpu.cache_mib > 0 and gpu.cache_bandwidth_gb_per_s:
        size, cache = elements * 4.0, gpu.cache_mib * 2.0**20
        w = size**2 / (size**2 + cache**2)
        inv = w / bw + (1 - w) / (gpu.cache_bandwidth_gb_per_s * 1e9)
    return elements * 4.0 * passes * inv / bandwidth_fraction


def _log_size_curve(curve: dict[float, float], elements: float, default: float) -> float:
    """A measured curve over fp32 [tokens x V] sizes in MiB at ``elements``: linear in log2 size
    between measured sizes, flat beyond them; ``default`` when nothing was measured."""
    if not curve or elements <= 0:
        return default
    return log2_interp(curve, elements * 4.0 / 2**20)


def loss_size_factor(gpu: GPUSpec, elements: float) -> float:
    """The measured head-and-loss time over the priced one at a micro-batch of ``elements`` fp32
    logits (GPUSpec.loss_size_factor); 1 where the profile measured no curve."""
    return _log_size_curve(gpu.loss_size_factor, elements, 1.0)


def loss_heap_bytes(gpu: GPUSpec, elements: float, kind: str | None) -> float:
    """Bytes of host heap a CPU process keeps resident for its training loss against a teacher
    target of ``kind`` (None: plain CE, "none") over a micro-batch of ``elements`` fp32 logits
    (GPUSpec.loss_heap_copies, measured); a kind measured at fewer than two sizes follows the
    dense curve's shape through its points. 0 on a GPU or where the kind was not measured."""
    table = gpu.loss_heap_copies
    curve = table.get(kind or "none") if gpu.kind == "cpu" else None
    if not curve:
        return 0.0
    dense = table.get("dense") or {}
    if len(curve) < 2 and len(dense) >= 2:
        mib, x = next(iter(curve.items()))
        ref = _log_size_curve(dense, mib * 2**20 / 4.0, 0.0)
        return (x / ref if ref > 0 else 0.0) * _log_size_curve(dense, elements, 0.0) * elements * 4.0
    return _log_size_curve(curve, elements, 0.0) * elements * 4.0


def optimizer_time(gpu: GPUSpec, params: float, bandwidth_fraction: float) -> float:
    """Adam update, memory bound: read/write fp32 master, m, v (24 B), read grads (4 B), write
    16-bit weights (2 B) per parameter at the achieved memory bandwidth."""
    return params * 30.0 / (gpu.memory_bandwidth_gb_per_s * 1e9 * bandwidth_fraction)


__all__ = ["PRECISION_BYTES", "peak_flops", "matmul_efficiency", "matmul_time", "LayerTime",
           "BLOCK_OPS_BASE", "BLOCK_OPS_GATED", "BLOCK_OPS_RMSNORM", "block_ops", "dispatch_floor_s", "layer_time",
           "ring_merge_s", "ring_accumulate_s", "logits_time", "optimizer_time", "logits_flops", "CE_PASSES", "KD_PASSES",
           "DEFAULT_TOPK_PASSES", "SAMPLE_PASSES", "nearest_vocab", "teacher_topk_passes", "loss_passes", "logit_softcap_passes",
           "loss_time", "loss_size_factor", "loss_heap_bytes"]
