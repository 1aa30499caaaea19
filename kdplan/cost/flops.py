"""FLOP counts (formulas.md section 1). Forward FLOPs of one transformer block and of the output
projection; backward = 2x forward. Counts are per micro-batch of ``b`` sequences of ``s`` tokens
and per GPU when a tensor-parallel degree ``tp`` is given (every matmul is split tp ways).

The attention core counts the full s x s score matrix (4*b*s^2*h: QK^T and AV), as Megatron's
published formula does; a causal kernel that skips the upper triangle does less work, which the
profile's attention efficiency absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schema.model import ModelSpec


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one transformer block per micro-batch (per GPU when tp > 1)."""

    qkv: float  # Q, K, V projections (K and V shrink by g/a under GQA)
    out_proj: float  # attention output projection
    attn_core: float  # QK^T and AV (the s^2 terms)
    mlp: float  # plain (2 matrices) or gated (3 matrices) MLP

    @property
    def attn_proj(self) -> float:
        return self.qkv + self.out_proj

    @property
    def total(self) -> float:
        return self.qkv + self.out_proj + self.attn_core + self.mlp


@dataclass(frozen=True)
class Matmul:
    """``count`` products (m x k) @ (k x n) of one block's forward, per GPU."""

    m: float  # rows: the tokens that pass through it
    n: float  # output width (tp-sharded where Megatron shards it)
    k: float  # input width
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


def block_matmuls(model: ModelSpec, *, tokens: float, tp: int = 1, ep: int = 1,
                  imbalance: float = 1.0) -> dict[str, list[Matmul]]:
    """The weight matmuls of one block's forward by part ("qkv", "out_proj", "mlp"), averaged
    over the blocks where they differ (MoE after dense blocks), tp-sharded as Megatron shards them.

    Attention: Q, K, V of a*d, g*d, g*d (d = head_dim; a*d may differ from h), or MLA's latent
    down projections (replicated) and per-head up projections (sharded). MLP: a dense gated or
    plain MLP; an MoE block runs the router (replicated), each of the E experts on its share
    tokens*k/E of the tokens (balanced routing: the work of top-k experts per token, whatever the
    imbalance, which changes only which expert does it) and the shared experts on every token.

    Expert parallelism (``ep`` > 1, a forward-only teacher): a rank holds E/ep experts, each
    running the share of all ep ranks' tokens, ep * tokens*k/E, times ``imbalance`` on the
    busiest rank (Overheads.expert_load_imbalance): the same work in fewer, taller matmuls. Model
    FLOPs (layer_flops, MFU) are counted at ep = 1 and no imbalance."""
    h, a, d, g, t = model.hidden_size, model.num_heads, model.head_dim, model.num_kv_heads, tokens
    if model.mla is None:
        qkv = [Matmul(t, (a * d + 2 * g * d) / tp, h)]
        out = [Matmul(t, h, a * d / tp)]
    else:
        m = model.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        qkv = [Matmul(t, m.kv_lora_rank + m.qk_rope_head_dim, h),
               Matmul(t, a * (m.qk_nope_head_dim + m.v_head_dim) / tp, m.kv_lora_rank)]
        qkv += ([Matmul(t, a * qk / tp, h)] if m.q_lora_rank is None else
                [Matmul(t, m.q_lora_rank, h), Matmul(t, a * qk / tp, m.q_lora_rank)])
        out = [Matmul(t, h, a * m.v_head_dim / tp)]
    L, n_moe = model.num_layers, model.moe_layers
    f = model.ffn_hidden_size
    w_dense = (L - n_moe) / L
    dense = [Matmul(t * w_dense, f / tp, h, 2 if model.gated_mlp else 1), Matmul(t * w_dense, h, f / tp)]
    mlp = dense if n_moe < L else []
    if n_moe:
        moe, w = model.moe, n_moe / L
        fe = moe.expert_ffn_hidden_size
        local = moe.num_experts // ep
        per_expert = t * w * moe.experts_per_token / moe.num_experts * (ep * imbalance if ep > 1 else 1.0)
        mlp += [Matmul(t * w, moe.num_experts, h),  # router
                Matmul(per_expert, fe / tp, h, 2 * local), Matmul(per_expert, h, fe / tp, local)]
        if moe.num_shared_experts:
            fs = moe.num_shared_experts * fe
            mlp += [Matmul(t * w, fs / tp, h, 2), Matmul(t * w, h, fs / tp)]
    return {"qkv": qkv, "out_proj": out, "mlp": mlp}


def attention_span_fraction(model: ModelSpec, s: int) -> float:
    """The attention core's work relative to every block attending over all s x s pairs: a
    sliding-window block of window w (< s) attends over 2sw - w^2 of the s^2 (the full-matrix
    convention of this module doubles the causal s*w - w^2/2), averaged over the blocks."""
    if model.sliding_window is None or model.sliding_window >= s:
        return 1.0
    w = model.sliding_window
    slide = model.sliding_layers
    return ((model.num_layers - slide) + slide * (2.0 * s * w - w * w) / (s * s)) / model.num_layers


def layer_flops(model: ModelSpec, *, b: int, s: int, tp: int = 1) -> LayerFlops:
    """Forward FLOPs of one block (block_matmuls; classic models: attention projections
    4bsh^2(1 + g/a), MLP 4bshf, 6bshf gated) and the attention core 2bs^2 a (d_qk + d_v) (4bs^2h
    for classic models), scaled by attention_span_fraction for sliding windows; per GPU at ``tp``.
    MoE blocks count the active experts only (what MFU counts)."""
    parts = {k: sum(mm.flops for mm in v) for k, v in block_matmuls(model, tokens=b * s, tp=tp).items()}
    d_v = model.mla.v_head_dim if model.mla is not None else model.head_dim
    core = 2.0 * b * s * s * model.num_heads * (model.head_dim + d_v) * attention_span_fraction(model, s)
    return LayerFlops(parts["qkv"], parts["out_proj"], core / tp, parts["mlp"])


def logits_flops(model: ModelSpec, *, b: int, s: int, tp: int = 1) -> float:
    """Forward FLOPs of the output (vocabulary) projection: 2*b*s*h*V / tp."""
    return 2.0 * b * s * model.hidden_size * model.vocab_size / tp


def forward_flops(model: ModelSpec, *, b: int, s: int) -> float:
    """Model forward FLOPs of one micro-batch on one replica (all layers + logits)."""
    return model.num_layers * layer_flops(model, b=b, s=s).total + logits_flops(model, b=b, s=s)


def train_model_flops(model: ModelSpec, *, sequences: int, s: int) -> float:
    """Model FLOPs of training on ``sequences`` sequences: forward + backward (2x), no recompute.
    This is the MFU convention (recomputation is hardware work, not model work)."""
    return 3.0 * forward_flops(model, b=sequences, s=s)


def megatron_iteration_flops(*, batch: int, s: int, layers: int, hidden: int, vocab: int,
                             recompute: bool = True) -> float:
    """Narayanan et al. (SC21) Eq. 3: FLOPs per iteration of a GPT-3-style model (f = 4h, MHA).
    With recompute: 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)); without: 72*B*s*l*h^2*(1 + s/(6h) +
    V/(12*l*h)). Used to turn published TFLOP/s into iteration times."""
    base = batch * s * layers * hidden * hidden
    if recompute:
        return 96.0 * base * (1 + s / (6 * hidden) + vocab / (16 * layers * hidden))
    return 72.0 * base * (1 + s / (6 * hidden) + vocab / (12 * layers * hidden))
