"""Memory per GPU (formulas.md section 2): model states under ZeRO, activations per layer
(Korthikanti et al. 2022), micro-batches in flight per pipeline schedule, logits buffers.

All results are bytes. ``q`` is the activation element size (2 for bf16/fp16).
"""

from __future__ import annotations

from ..schema.model import ModelSpec

GIB = float(2**30)


def has_dropout(model: ModelSpec) -> bool:
    """GPT-2/3-era models train with dropout (masks are stored); Llama-era models do not."""
    return model.family in ("gpt", "gpt2", "gpt_neox")


def activation_bytes_per_layer(model: ModelSpec, *, b: int, s: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none",
                               q: int = 2, flash: bool = False, selective: str = "attention_core",
                               eager: bool = False, block_fraction: float = 0.5) -> float:
    """Activations one block stores for backward, per micro-batch, per GPU.

    Korthikanti et al. 2022 for 16-bit with dropout, generalised to any f and to GQA:
    attention 11sbh + 5as^2b, MLP 19sbh (3sbh + 4sbf), norms 4sbh -> sbh(34 + 5as/h) at f = 4h.
    Tensor parallelism shards everything inside the attention and MLP blocks; sequence
    parallelism also shards the block inputs, norms and dropout masks. A fused attention kernel
    (``flash``) never stores the a*s^2 terms; full recompute keeps only the block input (2sbh,
    sharded by sequence parallelism). Selective recompute is the runtime's (``selective``, the
    profile's ``Overheads.selective_recompute``): "attention_core" (Megatron, kdplan's executor) drops the
    a*s^2 terms; "every_other_block" (torchtitan layer-level) stores on average half a
    block with nothing recomputed and half a block under full recompute, "blocks" (fms-fsdp) the
    same at ``block_fraction`` checkpointed blocks; "op_policy" (torchtitan
    op-level) see ``op_policy_bytes_per_layer``. ``eager`` (Overheads.block_ops): norms and
    SwiGLU run as separate PyTorch ops (Hugging Face modeling code): each RMSNorm also stores an
    fp32 copy of its input and its normalised output (4 bytes per element more than the fused
    count of input + next matmul input), SwiGLU also the activation's output (q*s*b*f).
    """
    h, a, g, f = model.hidden_size, model.num_heads, model.num_kv_heads, active_ffn_width(model)
    sbh = s * b * h
    sbq = s * b * model.q_width  # the attention's own width a*d (h for classic models)
    if recompute == "full":
        return q * sbh / (tp if sequence_parallel else 1)
    common = dict(b=b, s=s, tp=tp, sequence_parallel=sequence_parallel, q=q, flash=flash, eager=eager)
    if recompute == "selective" and selective in ("every_other_block", "blocks"):
        f = checkpointed_fraction(selective, block_fraction)
        return ((1 - f) * activation_bytes_per_layer(model, recompute="none", **common)
                + f * activation_bytes_per_layer(model, recompute="full", **common))
    if recompute == "selective" and selective == "op_policy":
        return op_policy_bytes_per_layer(model, b=b, s=s, tp=tp, sequence_parallel=sequence_parallel, q=q)
    drop = has_dropout(model)
    mask = q / 2  # one byte per element for a dropout mask at 16-bit (Korthikanti)
    # Inside attention (sharded by tp): Q and K (QK^T input), V, and scores.
    attn_inner = q * sbq * (1 + g / a) + q * sbq * g / a
    scores = 0.0
    if recompute != "selective" and not flash:
        scores = (q + (mask + q if drop else 0)) * a * s * s * b  # softmax out (+ mask, dropout out)
    # Inside the MLP: the activation's input and output (f-wide), gated adds the gate branch.
    mlp_inner = (3 if model.gated_mlp else 2) * q * s * b * f
    # Outside (replicated without sequence parallelism): the two block inputs (q each, the QKV
    # and first-MLP inputs), the output-projection and second-MLP inputs are inside; two norms'
    # inputs; two residual dropout masks.
    attn_out_in = q * sbq  # output projection input (sharded)
    mlp_out_in = 0.0  # the second MLP matmul's input is the activation output, counted above
    outer = 2 * q * sbh + 2 * q * sbh + (2 * mask * sbh if drop else 0)
    if eager and model.norm == "rmsnorm":
        outer += 2 * 4 * sbh  # two norms: fp32 input copy and normalised output vs the fused count
    if eager and model.gated_mlp:
        mlp_inner += q * s * b * f  # the activation's output, stored by the product
    inner = attn_inner + scores + mlp_inner + attn_out_in + mlp_out_in
    return inner / tp + outer / (tp if sequence_parallel else 1)


def checkpointed_fraction(selective: str, block_fraction: float) -> float:
    """Share of the blocks a block-level selective policy checkpoints whole (0: an op-level
    policy): every_other_block 0.5, blocks ``block_fraction`` (Overheads.checkpointed_block_fraction)."""
    return {"every_other_block": 0.5, "blocks": block_fraction}.get(selective, 0.0)


def active_ffn_width(model: ModelSpec) -> float:
    """MLP inner width a token's activations span, averaged over the blocks: f for a dense block;
    (top-k + shared experts) x the expert width for an MoE block (each token's activations live
    in the experts it is routed to)."""
    if model.moe is None:
        return float(model.ffn_hidden_size)
    moe, L = model.moe, model.num_layers
    per_moe = (moe.experts_per_token + moe.num_shared_experts) * moe.expert_ffn_hidden_size
    return ((L - model.moe_layers) * model.ffn_hidden_size + model.moe_layers * per_moe) / L
def op_policy_bytes_per_layer(model: ModelSpec, *, b: int, s: int, tp: int = 1,
                              sequence_parallel: bool = False, q: int = 2) -> float:
    """Activations one block stores under torchtitan's op-level selective checkpointing
    (torchtitan models/llama3 parallelize ``_apply_ac_to_transformer_block``: save the outputs of
    matmuls and of the attention kernel, except every second matmul; recompute pointwise ops).
    Block matmuls in order wq, wk, wv, wo, w1, w3, w2 (non-gated: fc1, fc2): saved wq, wv, w1, w2
    (fc1), recomputed wk, wo, w3 (fc2). Stored: Q (sbh), V (sbh*g/a), the attention output (sbh)
    and its fp32 log-sum-exp (4*b*a*s), the first MLP matmul's output (s*b*f) and, gated, the
    block's MLP output (sbh); outside the tensor-parallel region the block input and the
    attention residual (2 sbh) the recomputed norms start from, and dropout masks where the model
    has dropout."""
    h, a, g, f = model.hidden_size, model.num_heads, model.num_kv_heads, active_ffn_width(model)
    sbh = s * b * h
    inner = q * sbh * (2 + g / a) + 4 * b * a * s + q * s * b * f + (q * sbh if model.gated_mlp else 0)
    outer = 2 * q * sbh + (2 * (q / 2) * sbh if has_dropout(model) else 0)
    return inner / tp + outer / (tp if sequence_parallel else 1)


def op_policy_recompute_share(model: ModelSpec) -> float:
    """Share of a block's matmul FLOPs the op-level policy recomputes (wk, wo and w3 / fc2)."""
    h, g, d, f = model.hidden_size, model.num_kv_heads, model.head_dim, model.ffn_hidden_size
    total = h * (h + 2 * g * d) + h * h + (3 if model.gated_mlp else 2) * h * f
    return (h * g * d + h * h + h * f) / total


def in_flight(schedule: str, *, stage: int, pp: int, m: int, v: int = 1) -> float:
    """Micro-batches whose activations a pipeline stage holds at its peak, in units of the
    stage's full activation set. 1F1B: min(p - i, m); GPipe: m; interleaved 1F1B with v chunks:
    ((p - i - 1)*2 + (v - 1)*p + 1) chunk-micro-batches of 1/v each (stage 0: p + (p-1)/v)."""
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved_1f1b" and v > 1:
        chunks = (pp - stage - 1) * 2 + (v - 1) * pp + 1
        return min(chunks, m * v) / v
    return float(min(pp - stage, m))


def model_state_bytes(params: float, *, dp: int, zero: int, weight_bytes: int = 2,
                      grad_bytes: int = 2, optimizer_bytes: int = 12, train: bool = True) -> dict[str, float]:
    """Weights, gradients and optimizer state of ``params`` parameters on one GPU.

    Mixed-precision Adam: 2 (16-bit weights) + 2 (grads) + 12 (fp32 master, m, v) = 16 bytes per
    parameter (18 with Megatron's fp32 main gradients: grad_bytes=4). ZeRO-1 shards the optimizer
    over ``dp``, ZeRO-2 also the gradients, ZeRO-3 also the weights. A frozen model (``train``
    False: the teacher) holds weights only.
    """
    w = params * weight_bytes
    if not train:
        return {"weights": w / (dp if zero >= 3 else 1)}
    grads = params * grad_bytes
    opt = params * optimizer_bytes
    return {
        "weights": w / (dp if zero >= 3 else 1),
        "gradients": grads / (dp if zero >= 2 else 1),
        "optimizer": opt / (dp if zero >= 1 else 1),
    }


def optimizer_step_bytes(params: float, *, shard: int, zero: int, per_param: float) -> float:
    """What the optimizer step allocates on top of the model states (Overheads.optimizer_step_bytes
    per parameter this GPU updates: all of its parameters, or 1/shard of them under ZeRO >= 1).
    InternEvo (hybrid_zero_optim.py ``_step``, fsdp_optimizer.py ``step``) makes an fp32 copy of
    the gradients (4) through a flattened 16-bit copy (2, HybridZero) and runs torch's AdamW,
    whose foreach path allocates one fp32 temporary per parameter (4)."""
    return params / (shard if zero >= 1 else 1) * per_param


def logits_bytes(model: ModelSpec, *, b: int, s: int, tp: int = 1, q: int = 2, fp32_copies: int = 1) -> float:
    """Output logits and the loss workspace at the loss's peak: b*s*V/t * (q + 4 * fp32_copies)
    (16-bit logits and the fp32 tensors the runtime's loss holds: Overheads.loss_fp32_logit_copies)."""
    return b * s * model.vocab_size / tp * (q + 4 * fp32_copies)
