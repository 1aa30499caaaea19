"""The families of issue 19 in the executor: tiny random configs of each build through their own
transformers classes, hold exactly the parameters ModelSpec counts, and run forward on CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kdplan.models import from_hf_config  # noqa: E402

pytestmark = pytest.mark.executor

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
TINY = {
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, norm_topk_prob=True),
    "gemma2": dict(BASE, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        sliding_window_pattern=2, rope_local_base_freq=10000.0, rope_theta=1e6),
    "phi3": dict(BASE, model_type="phi3", num_key_value_heads=4, sliding_window=8),
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(BASE, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
}


def tiny(family: str):
    return from_hf_config(TINY[family], f"tiny-{family}/config.json")
