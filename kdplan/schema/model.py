"""ModelSpec: the shape of a decoder-only transformer, all the cost model and executor need.

Dense and mixture-of-experts (``moe``) blocks, grouped-query or multi-head latent attention
(``mla``, DeepSeek-V3), sliding-window layers and soft-capping (Gemma 2/3). Parameter counts:
``num_params`` counts every parameter (what memory holds), ``active_params`` those one token
runs through (the routed top-k experts, shared experts and router of an MoE block; what FLOPs
and MFU count).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .common import Strict

Family = Literal["gpt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2",
                 "gemma3_text", "phi3", "mixtral", "qwen3_moe", "deepseek_v3"]


class MoESpec(Strict):
    """Mixture-of-experts MLP blocks (Mixtral, Qwen3-MoE, DeepSeek-V3): each token is routed to
    ``experts_per_token`` of ``num_experts`` gated-MLP experts, plus the shared experts every token
    runs through."""

    num_experts: int = Field(gt=0, le=100_000)
    """Routed experts per MoE block."""
    experts_per_token: int = Field(gt=0, le=100_000)
    """Routed experts each token runs through (top-k)."""
    expert_ffn_hidden_size: int = Field(gt=0, le=10_000_000)
    """Inner width of one expert's gated MLP."""
    num_shared_experts: int = Field(default=0, ge=0, le=1_000)
    """Experts of the same width every token runs through (DeepSeek-V3: 1)."""
    first_dense_layers: int = Field(default=0, ge=0, le=100_000)
    """Leading blocks with a dense MLP of ``ModelSpec.ffn_hidden_size`` (DeepSeek-V3: 3)."""
    router_bias: bool = False
    """A per-expert routing bias (DeepSeek-V3's aux-loss-free balancing)."""
    normalize_topk: bool = True
    """The top-k routing weights are renormalised to sum to 1 (Mixtral always; Qwen3-MoE's and
    DeepSeek-V3's norm_topk_prob). Routing details change no cost; the executor needs them to
    reproduce a checkpoint's outputs."""
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    """Scale of the routed experts' sum (DeepSeek-V3: 2.5)."""
    expert_groups: int = Field(default=1, ge=1, le=100_000)
    """Experts are chosen within the best ``topk_groups`` of this many groups (DeepSeek-V3: 8)."""
    topk_groups: int = Field(default=1, ge=1, le=100_000)
    """Groups the top-k experts may come from (DeepSeek-V3: 4)."""

    @model_validator(mode="after")
    def _check(self) -> "MoESpec":
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} exceeds num_experts {self.num_experts}")
        if self.num_experts % self.expert_groups or self.topk_groups > self.expert_groups:
            raise ValueError(f"{self.num_experts} experts in {self.expert_groups} groups, top-k from "
                             f"{self.topk_groups}: groups must divide the experts and hold the top-k groups")
        return self


class MLASpec(Strict):
    """Multi-head latent attention (DeepSeek-V2/V3): queries and keys/values pass through low-rank
    latents; each head's query/key is a non-rotary part plus a rotary part shared by all heads."""

    q_lora_rank: int | None = Field(default=None, gt=0, le=1_000_000)
    """Query latent width (None: a direct h -> heads x qk projection)."""
    kv_lora_rank: int = Field(gt=0, le=1_000_000)
    """Key/value latent width."""
    qk_nope_head_dim: int = Field(gt=0, le=100_000)
    """Per-head non-rotary query/key width."""
    qk_rope_head_dim: int = Field(gt=0, le=100_000)
    """Rotary query/key width (one rotary key shared by the heads)."""
    v_head_dim: int = Field(gt=0, le=100_000)
    """Per-head value width."""


class ModelSpec(Strict):
    """Architecture of a decoder-only causal language model (one name per concept everywhere)."""

    name: str
    """Preset name or the config file it was read from."""
    family: Family = "llama"
    """Architecture family (the HF model_type); decides the executor's module names."""
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
    head_dim: int | None = Field(default=None, gt=0, le=100_000)
    """Query/key width per head d; hidden_size / num_heads when not given (Qwen3 and Gemma give
    their own: query width a*d may differ from h). For MLA: qk_nope_head_dim + qk_rope_head_dim."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key (Qwen3, Gemma 3)."""
    sliding_window: int | None = Field(default=None, gt=0, le=100_000_000)
    """Local attention window in tokens (None: every layer attends to the whole sequence)."""
    sliding_window_pattern: int | None = Field(default=None, ge=2, le=100_000)
    """Every N-th layer attends globally, the others within ``sliding_window`` (Gemma 2: 2,
    Gemma 3: 6); None: all layers use ``sliding_window`` when it is set (Mistral v0.1, Phi-3)."""
    attn_logit_softcapping: float | None = Field(default=None, gt=0)
    """Attention scores pass through cap * tanh(x / cap) (Gemma 2)."""
    final_logit_softcapping: float | None = Field(default=None, gt=0)
    """Output logits pass through cap * tanh(x / cap) (Gemma 2)."""
    query_pre_attn_scalar: float | None = Field(default=None, gt=0)
    """Attention scale 1/sqrt(this) instead of 1/sqrt(head_dim) (Gemma 2/3; executor)."""
    rope_local_theta: float | None = Field(default=None, gt=0)
    """Rotary base of the sliding-window layers (Gemma 3; executor)."""
    rope_scaling: dict[str, float | int | str | list[float]] | None = None
    """The config's rotary scaling as stated (rope_type and its factors: Llama 3.1's "llama3",
    Gemma 3's "linear", DeepSeek-V3's "yarn"); changes no cost, and the executor passes it on so
    that a checkpoint's positions are encoded as it was trained. None: plain rotary."""
    moe: MoESpec | None = None
    """Mixture-of-experts MLP blocks (None: dense)."""
    mla: MLASpec | None = None
    """Multi-head latent attention (None: grouped-query attention)."""

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("head_dim") is None:
            h, a, mla = data.get("hidden_size"), data.get("num_heads"), data.get("mla")
            if isinstance(mla, MLASpec):
                mla = mla.model_dump()
            if isinstance(mla, dict) and isinstance(mla.get("qk_nope_head_dim"), int) \
                    and isinstance(mla.get("qk_rope_head_dim"), int):
                data = dict(data, head_dim=mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"])
            elif isinstance(h, int) and isinstance(a, int) and a > 0 and not isinstance(h, bool):
                if h % a:
                    raise ValueError(f"hidden_size {h} is not divisible by num_heads {a} (give head_dim)")
                data = dict(data, head_dim=h // a)
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.moe is not None and self.moe.first_dense_layers > self.num_layers:
            raise ValueError(f"moe.first_dense_layers {self.moe.first_dense_layers} exceeds num_layers "
                             f"{self.num_layers}")
        if self.sliding_window_pattern is not None and self.sliding_window is None:
            raise ValueError("sliding_window_pattern is set but sliding_window is not")
        return self

    # ---- layer kinds ----------------------------------------------------------------------------
    @property
    def moe_layers(self) -> int:
        """Blocks with an MoE MLP (the rest are dense)."""
        return 0 if self.moe is None else self.num_layers - self.moe.first_dense_layers

    @property
    def sliding_layers(self) -> int:
        """Blocks whose attention is limited to ``sliding_window`` (Gemma 2: layer i slides when i
        is even; Gemma 3: unless (i + 1) is a multiple of the pattern)."""
        if self.sliding_window is None:
            return 0
        if self.sliding_window_pattern is None:
            return self.num_layers
        return self.num_layers - self.num_layers // self.sliding_window_pattern

    # ---- parameter counts (formulas.md section 1) -------------------------------------------
    @property
    def q_width(self) -> int:
        """Width of all query heads a*d (h for classic models)."""
        return self.num_heads * self.head_dim

    def attention_matmul_params(self) -> tuple[int, int]:
        """Weights of the attention's input projections (Q, K, V; MLA's latent down and up
        projections) and of its output projection, biases excluded."""
        h, a = self.hidden_size, self.num_heads
        if self.mla is not None:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = h * a * qk if m.q_lora_rank is None else h * m.q_lora_rank + m.q_lora_rank * a * qk
            kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * a * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv, a * m.v_head_dim * h
        d = self.head_dim
        return h * (a * d + 2 * self.num_kv_heads * d), a * d * h

    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        inp, out = self.attention_matmul_params()
        if self.mla is not None:  # the two latent RMSNorms
            return inp + out + (self.mla.q_lora_rank or 0) + self.mla.kv_lora_rank
        bias = (self.num_heads * d + 2 * self.num_kv_heads * d) if self.qkv_bias else 0
        plain_bias = 4 * h if self.family in ("gpt", "gpt2", "gpt_neox") else 0
        qk_norm = 2 * d if self.qk_norm else 0
        return inp + out + bias + plain_bias + qk_norm

    def dense_mlp_params(self) -> int:
        """One dense MLP block (ffn_hidden_size wide)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        if self.gated_mlp:
            return 3 * h * f
        plain_bias = (f + h) if self.family in ("gpt", "gpt2", "gpt_neox") else 0
        return 2 * h * f + plain_bias

    def expert_params(self) -> int:
        """One expert (a gated MLP of expert_ffn_hidden_size); 0 for a dense model."""
        return 0 if self.moe is None else 3 * self.hidden_size * self.moe.expert_ffn_hidden_size

    def router_params(self) -> int:
        moe = self.moe
        return 0 if moe is None else self.hidden_size * moe.num_experts + (moe.num_experts if moe.router_bias else 0)

    def moe_mlp_params(self, *, active: bool = False) -> int:
        """One MoE block's MLP: router, routed experts (all, or the top-k a token runs through
        when ``active``) and shared experts."""
        moe = self.moe
        if moe is None:
            return 0
        routed = moe.experts_per_token if active else moe.num_experts
        return self.router_params() + (routed + moe.num_shared_experts) * self.expert_params()

    def mlp_params(self) -> float:
        """MLP parameters per block, averaged over the blocks (dense and MoE)."""
        n_moe = self.moe_layers
        return ((self.num_layers - n_moe) * self.dense_mlp_params() + n_moe * self.moe_mlp_params()) / self.num_layers

    def norm_params(self) -> int:
        per = 2 * self.hidden_size if self.norm == "layernorm" else self.hidden_size
        # Gemma 2/3 norm both the input and the output of attention and MLP (4 per block).
        return (4 if self.family in ("gemma2", "gemma3_text") else 2) * per

    def layer_params(self) -> float:
        """Parameters of one transformer block (averaged over the blocks when they differ:
        DeepSeek-V3's first dense blocks); integral for models of one block kind."""
        return self.attention_params() + self.mlp_params() + self.norm_params()

    def active_layer_params(self) -> float:
        """Parameters one token runs through in a block, averaged over the blocks."""
        n_moe = self.moe_layers
        mlp = ((self.num_layers - n_moe) * self.dense_mlp_params()
               + n_moe * self.moe_mlp_params(active=True)) / self.num_layers
        return self.attention_params() + mlp + self.norm_params()

    def embedding_params(self) -> int:
        """Input embedding (+ learned positions) and the output projection unless tied."""
        e = self.vocab_size * self.hidden_size
        if self.learned_positions:
            e += self.max_positions * self.hidden_size
        if not self.tied_embeddings:
            e += self.vocab_size * self.hidden_size
        return e

    def _final_norm(self) -> int:
        return (2 if self.norm == "layernorm" else 1) * self.hidden_size

    def num_params(self) -> int:
        """Total parameters, including the final norm (what memory holds)."""
        return round(self.num_layers * self.layer_params()) + self.embedding_params() + self._final_norm()

    def active_params(self) -> int:
        """Parameters one token runs through (MoE: top-k routed + shared experts and the router;
        = num_params for a dense model). Embeddings included, as MoE model cards count them."""
        return round(self.num_layers * self.active_layer_params()) + self.embedding_params() + self._final_norm()
