"""The matrix-multiply and attention shapes a model's transformer layers produce.

`kdplan profile` measures these (forward and backward) instead of square matrices, because the
achieved fraction of peak depends on the shape: a narrow tensor-parallel shard or a small
micro-batch runs far below peak. On a CPU the shapes are scaled down (all dimensions by one
factor) so that a profile finishes in seconds; the efficiency curve is fitted in FLOPs, so scaled
shapes still describe the same curve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..schema.model import ModelSpec


@dataclass(frozen=True)
class Gemm:
    """One matrix multiply [m, k] x [k, n]: 2*m*k*n FLOPs."""

    label: str  # e.g. "gpt-1.3b tp1 mlp_up fwd"
    m: int
    k: int
    n: int

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


@dataclass(frozen=True)
class Attention:
    """Attention core of one layer: batch, local heads, sequence, head dim (SDPA, causal)."""

    label: str
    batch: int
    heads: int
    seq: int
    head_dim: int

    @property
    def flops(self) -> float:
        # formulas.md section 1: F_attn_core = 4*b*s^2*h (full-mask convention, QK^T and AV)
        return 4.0 * self.batch * self.seq * self.seq * self.heads * self.head_dim


def _scaled(x: int, scale: float, multiple: int = 8) -> int:
    return max(multiple, int(round(x / scale / multiple)) * multiple)


def layer_gemms(spec: ModelSpec, *, tokens: int, tp: int = 1, scale: float = 1.0) -> list[Gemm]:
    """Forward and backward GEMMs of one transformer layer plus the logits, for ``tokens`` tokens
    (= micro_batch * seq_len) on one tensor-parallel shard; every dimension divided by ``scale``."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * d
    up = f * (2 if spec.gated_mlp else 1)
    t = _scaled(tokens, scale)
    fwd = {  # name: (k, n) of x[t, k] @ W[k, n]
        "qkv": (h, qkv // tp),
        "attn_out": (h // tp, h),
        "mlp_up": (h, up // tp),
        "mlp_down": (f // tp, h),
        "logits": (h, spec.vocab_size // tp),
    }
    out: list[Gemm] = []
    for name, (k, n) in fwd.items():
        k, n = _scaled(k, scale), _scaled(n, scale)
        base = f"{spec.name} tp{tp} {name}"
        out.append(Gemm(f"{base} fwd", t, k, n))
        out.append(Gemm(f"{base} bwd_input", t, n, k))  # dX = dY W^T
        out.append(Gemm(f"{base} bwd_weight", k, t, n))  # dW = X^T dY
    return out


def layer_attention(spec: ModelSpec, *, micro_batch: int, seq_len: int, tp: int = 1,
                    scale: float = 1.0) -> Attention:
    heads = max(1, spec.num_heads // tp)
    return Attention(f"{spec.name} tp{tp} attention", micro_batch, heads, _scaled(seq_len, scale),
                     spec.head_dim)


def cpu_scale(spec: ModelSpec, tokens: int, budget_gflop: float) -> float:
    """Smallest scale factor (>= 1) that brings the model's largest forward GEMM under the budget.
    FLOPs shrink with the cube of the scale since all three dimensions shrink."""
    largest = max(g.flops for g in layer_gemms(spec, tokens=tokens))
    return max(1.0, (largest / (budget_gflop * 1e9)) ** (1.0 / 3.0))


def bench_spec(specs: list[ModelSpec], *, tokens: int, micro_batch: int, seq_len: int, tps: list[int],
               budget_gflop: float | None) -> dict:
    """The shape list handed to executor.bench.run (JSON-able): gemms and attention per model."""
    gemms, attn = [], []
    for spec in specs:
        scale = cpu_scale(spec, tokens, budget_gflop) if budget_gflop else 1.0
        for tp in tps:
            if spec.num_heads % tp or spec.num_kv_heads % tp and spec.num_kv_heads >= tp:
                continue
            gemms += [asdict(g) for g in layer_gemms(spec, tokens=tokens, tp=tp, scale=scale)]
            attn.append(asdict(layer_attention(spec, micro_batch=micro_batch, seq_len=seq_len, tp=tp,
                                               scale=scale)))
    return {"gemms": gemms, "attention": attn}
