"""ModelSpec: the shape of a decoder-only transformer, all the cost model and executor need."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import Strict


class ModelSpec(Strict):
    """Architecture of a decoder-only causal language model (one name per concept everywhere)."""

    name: str
    """Preset name or the config file it was read from."""
    family: Literal["gpt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2"] = "llama"
    """Architecture family; decides the executor's module names (only llama/mistral/qwen2 run)."""
    num_layers: int = Field(gt=0, le=100_000)
    """Transformer blocks."""
    hidden_size: int = Field(gt=0, le=1_000_000)
    """Model width h."""
    num_heads: int = Field(gt=0, le=100_000)
    """Query attention heads a."""
    num_kv_heads: int = Field(gt=0, le=100_000)
    """Key/value heads g (g < a is grouped-query attention, g == a multi-head)."""
    ffn_hidden_size: int = Field(gt=0, le=10_000_000)
    """MLP inner width f."""
    gated_mlp: bool = True
    """SwiGLU-style gated MLP (3 matrices) instead of a plain 2-matrix MLP."""
    vocab_size: int = Field(gt=0, le=10_000_000)
    """Vocabulary size V."""
    tied_embeddings: bool = False
    """Input embedding and output projection share one matrix."""
    max_positions: int = Field(gt=0, le=100_000_000)
    """Longest sequence the model supports."""
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    """Normalisation layer type."""
    learned_positions: bool = False
    """Learned absolute position embeddings (GPT-2/GPT-3) instead of rotary."""
    qkv_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Rotary base (used by the executor when it builds the model)."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Normalisation epsilon (executor)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # ---- parameter counts (formulas.md section 1) -------------------------------------------
    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        kv = 2 * self.num_kv_heads * d * h
        bias = (self.num_heads * d + 2 * self.num_kv_heads * d) if self.qkv_bias else 0
        plain_bias = 4 * h if self.family in ("gpt", "gpt2", "gpt_neox") else 0
        return 2 * h * h + kv + bias + plain_bias

    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        if self.gated_mlp:
            return 3 * h * f
        plain_bias = (f + h) if self.family in ("gpt", "gpt2", "gpt_neox") else 0
        return 2 * h * f + plain_bias

    def norm_params(self) -> int:
        per = 2 * self.hidden_size if self.norm == "layernorm" else self.hidden_size
        return 2 * per

    def layer_params(self) -> int:
        """Parameters of one transformer block."""
        return self.attention_params() + self.mlp_params() + self.norm_params()

    def embedding_params(self) -> int:
        """Input embedding (+ learned positions) and the output projection unless tied."""
        e = self.vocab_size * self.hidden_size
        if self.learned_positions:
            e += self.max_positions * self.hidden_size
        if not self.tied_embeddings:
            e += self.vocab_size * self.hidden_size
        return e

    def num_params(self) -> int:
        """Total parameters, including the final norm."""
        final_norm = (2 if self.norm == "layernorm" else 1) * self.hidden_size
        return self.num_layers * self.layer_params() + self.embedding_params() + final_norm
