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


def layer_flops(model: ModelSpec, *, b: int, s: int, tp: int = 1) -> LayerFlops:
    """Forward FLOPs of one block: attention projections 4bsh^2(1 + g/a), core 4bs^2h,
    MLP 4bshf (6bshf gated), each divided by ``tp``."""
    h, a, g, f = model.hidden_size, model.num_heads, model.num_kv_heads, model.ffn_hidden_size
    n = b * s  # tokens in the micro-batch
    qkv = 2.0 * n * h * (h + 2.0 * h * g / a)
    out_proj = 2.0 * n * h * h
    core = 4.0 * b * s * s * h
    mlp = 2.0 * n * h * f * (3 if model.gated_mlp else 2)
    return LayerFlops(qkv / tp, out_proj / tp, core / tp, mlp / tp)


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
