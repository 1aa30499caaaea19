"""The model families beyond Llama / Mistral / Qwen2: their Hugging Face configs from a ModelSpec,
the buffers a meta build leaves empty, and the layouts the executor runs them in.

Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text), Phi-3, Mixtral and DeepSeek-V3 are built by their own
transformers classes from the spec (``family_config``), so a local checkpoint of the real model
loads into them by name. Sliding-window layers are passed as an explicit ``layer_types`` list (the
rule of ``ModelSpec.sliding_layers``), not left to each config class's default.

Forward: a whole model of these families runs its own HF forward (``own_forward``), not the
pipeline's block loop. Layouts: these families run data-parallel (DDP, or FSDP2 at zero >= 1, which shards an MoE
model's experts over the dp group like every other weight), and an MoE teacher also expert-parallel
(teacher.layout.ep, executor/expert_parallel.py); tensor and pipeline parallelism use the Llama
module names (executor/parallelize.py, executor/pipeline.py) and are refused for them
(``unsupported_layout``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdplan.schema import ModelSpec
from kdplan.schema.capability import OWN_FORWARD_FAMILIES, family_unsupported

FAMILIES = OWN_FORWARD_FAMILIES  # the capability table (kdplan.schema.capability) names them


def attn_implementation(spec: ModelSpec, default: str) -> str:
    """Attention kernel for ``spec``: soft-capped scores (Gemma 2) need eager attention, because
    SDPA has no soft-cap and would silently skip it (the cost model prices it unfused)."""
    return "eager" if spec.attn_logit_softcapping is not None else default


def layer_types(spec: ModelSpec) -> list[str]:
    """"sliding_attention" / "full_attention" per block, as ModelSpec.sliding_layers counts them:
    every block when no pattern is given; else every ``pattern``-th block (1-based) is global."""
    n, w, pat = spec.num_layers, spec.sliding_window, spec.sliding_window_pattern
    if w is None:
        return ["full_attention"] * n
    return ["sliding_attention" if pat is None or (i + 1) % pat else "full_attention" for i in range(n)]


def family_config(spec: ModelSpec, common: dict):
    """The transformers config of ``spec`` (a family in FAMILIES); ``common`` holds the keys every
    Llama-like config shares (executor.models.hf_config)."""
    import transformers

    common = dict(common, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    f = spec.family
    moe = spec.moe
    if f in ("qwen3", "qwen3_moe"):
        kw = dict(head_dim=spec.head_dim, attention_bias=spec.qkv_bias, use_sliding_window=False)
        if f == "qwen3_moe":
            kw.update(num_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                      moe_intermediate_size=moe.expert_ffn_hidden_size, norm_topk_prob=moe.normalize_topk,
                      decoder_sparse_step=1, mlp_only_layers=[])
        name = "Qwen3Config" if f == "qwen3" else "Qwen3MoeConfig"
    elif f in ("gemma2", "gemma3_text"):
        scalar = spec.query_pre_attn_scalar or spec.head_dim
        kw = dict(head_dim=spec.head_dim, query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                  sliding_window=spec.sliding_window, layer_types=layer_types(spec),
                  attn_logit_softcapping=spec.attn_logit_softcapping,
                  final_logit_softcapping=spec.final_logit_softcapping, hidden_activation="gelu_pytorch_tanh")
        if f == "gemma3_text":
            kw["rope_local_base_freq"] = spec.rope_local_theta or 10000.0
        name = "Gemma2Config" if f == "gemma2" else "Gemma3TextConfig"
    elif f == "phi3":
        kw, name = dict(sliding_window=spec.sliding_window), "Phi3Config"
    elif f == "mixtral":
        kw = dict(sliding_window=spec.sliding_window, num_local_experts=moe.num_experts,
                  num_experts_per_tok=moe.experts_per_token)
        name = "MixtralConfig"
    elif f == "deepseek_v3":
        mla = spec.mla
        kw = dict(q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
                  qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                  n_routed_experts=moe.num_experts, n_shared_experts=moe.num_shared_experts,
                  num_experts_per_tok=moe.experts_per_token, moe_intermediate_size=moe.expert_ffn_hidden_size,
                  first_k_dense_replace=moe.first_dense_layers, n_group=moe.expert_groups,
                  topk_group=moe.topk_groups, routed_scaling_factor=moe.routed_scaling_factor,
                  norm_topk_prob=moe.normalize_topk)
        name = "DeepseekV3Config"
    else:
        raise ValueError(f"family {f!r} is not one of {FAMILIES}")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"{spec.name}: this transformers ({transformers.__version__}) has no {name}; "
                         f"the {f} family needs a newer transformers")
    return cls(**common, **kw)


def unsupported_layout(spec: ModelSpec, *, tp: int, pp: int, role: str, forward_precision: str = "bf16") -> str | None:
    """Why the executor cannot run ``spec`` with this layout, or None (kdplan.schema.capability's
    family rules, which executor.launch.check applies to every plan)."""
    u = family_unsupported(spec, tp=tp, pp=pp, role=role, forward_precision=forward_precision)
    return u.message if u else None


def runs_own_forward(config) -> bool:
    """True for a model of these families: a whole model (they run in one stage) runs its own HF
    forward, which builds the sliding-window masks, soft-caps scores and logits and picks Gemma 3's
    rotary base per layer; executor.pipeline's block loop does none of that."""
    return getattr(config, "model_type", None) in FAMILIES


def own_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token ids [B, T] -> logits [B, T, V] through the model's HF forward (causal, no cache)."""
    return type(self).forward(self, input_ids=x, use_cache=False).logits


@torch.no_grad()
def restore_buffers(model: nn.Module, device) -> None:
    """Refill the buffers a meta build leaves empty after ``to_empty``: rotary frequencies (every
    buffer ending in inv_freq, Gemma 3's per-attention-kind ones included), Gemma's embedding
    scale sqrt(h), and DeepSeek-V3's routing bias (zeros, HF's init; a checkpoint overwrites it)."""
    cfg = getattr(model, "config", None)
    for mod in model.modules():
        names = [n for n, _ in mod.named_buffers(recurse=False)]
        if any(n.endswith("inv_freq") for n in names) and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(mod, bname, buf.to(device))
        if "embed_scale" in names and cfg is not None:
            mod.embed_scale = torch.tensor(cfg.hidden_size**0.5, device=device, dtype=mod.embed_scale.dtype)
        if "e_score_correction_bias" in names:
            mod.e_score_correction_bias.zero_()
