"""Model specs: presets and Hugging Face ``config.json`` files of the GPT-2, GPT-NeoX, Llama,
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Mixtral, Qwen3-MoE and DeepSeek-V3
families, read into one ``ModelSpec``.

Preset shapes come from the published configs (sources next to each); ``PUBLISHED_PARAMS`` holds
the parameter counts their authors publish, which a test checks ``ModelSpec.num_params`` against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import DifferentTokenizers, InputError
from .io import explain_validation, parse_data, read_text
from .schema.model import ModelSpec

# GPT-3 paper (Brown et al. 2020, Table 2.1) shapes with GPT-2's 50,257-token vocabulary,
# learned positions, LayerNorm, plain 4h GeLU MLP, tied embeddings, 2048 context.
_GPT3 = dict(family="gpt", gated_mlp=False, vocab_size=50257, tied_embeddings=True,
             max_positions=2048, norm="layernorm", learned_positions=True)

_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_QWEN3 = dict(family="qwen3", vocab_size=151936, max_positions=40960, head_dim=128, qk_norm=True,
              rope_theta=1000000.0, norm_eps=1e-6)
_GEMMA2 = dict(family="gemma2", vocab_size=256000, tied_embeddings=True, max_positions=8192,
               sliding_window=4096, sliding_window_pattern=2, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, norm_eps=1e-6)
_GEMMA3 = dict(family="gemma3_text", vocab_size=262208, tied_embeddings=True, max_positions=131072,
               head_dim=256, qk_norm=True, sliding_window=1024, sliding_window_pattern=6,
               query_pre_attn_scalar=256.0, rope_theta=1000000.0, rope_local_theta=10000.0, norm_eps=1e-6)

_GEMMA3_ROPE = dict(rope_type="linear", factor=8.0)  # the global layers of gemma-3-{4b,12b,27b}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt-1.3b": dict(_GPT3, num_layers=24, hidden_size=2048, num_heads=16, num_kv_heads=16,
                     ffn_hidden_size=8192),
    "gpt-2.7b": dict(_GPT3, num_layers=32, hidden_size=2560, num_heads=32, num_kv_heads=32,
                     ffn_hidden_size=10240),
    "gpt-6.7b": dict(_GPT3, num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                     ffn_hidden_size=16384),
    "gpt-13b": dict(_GPT3, num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40,
                    ffn_hidden_size=20480),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": dict(family="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                       ffn_hidden_size=14336, vocab_size=128256, max_positions=8192,
                       rope_theta=500000.0),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": dict(family="llama", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                        ffn_hidden_size=28672, vocab_size=128256, max_positions=8192,
                        rope_theta=500000.0),
    # meta-llama/Llama-3.1-405B config.json
    "llama-3.1-405b": dict(family="llama", num_layers=126, hidden_size=16384, num_heads=128,
                           num_kv_heads=8, ffn_hidden_size=53248, vocab_size=128256,
                           max_positions=131072, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    # meta-llama/Llama-3.2-1B / 3B config.json (tied embeddings)
    "llama-3.2-1b": dict(family="llama", num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=8192, vocab_size=128256, max_positions=131072,
                         tied_embeddings=True, rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(family="llama", num_layers=28, hidden_size=3072, num_heads=24, num_kv_heads=8,
                         ffn_hidden_size=8192, vocab_size=128256, max_positions=131072,
                         tied_embeddings=True, rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0)),
    # Qwen/Qwen2.5-7B and -72B config.json (bias on q/k/v)
    "qwen2.5-7b": dict(family="qwen2", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                       ffn_hidden_size=18944, vocab_size=152064, max_positions=131072,
                       qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6),
    "qwen2.5-72b": dict(family="qwen2", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                        ffn_hidden_size=29568, vocab_size=152064, max_positions=131072,
                        qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6),
    # meta-llama/Llama-3.1-8B and -70B config.json
    "llama-3.1-8b": dict(family="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=14336, vocab_size=128256, max_positions=131072,
                         rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-70b": dict(family="llama", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                          ffn_hidden_size=28672, vocab_size=128256, max_positions=131072,
                          rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    # Qwen/Qwen3-{0.6B,1.7B,4B,8B,32B} config.json: head_dim 128 whatever the width, q/k RMSNorm,
    # no q/k/v bias; the three small ones tie their embeddings.
    "qwen3-0.6b": dict(_QWEN3, num_layers=28, hidden_size=1024, num_heads=16, num_kv_heads=8,
                       ffn_hidden_size=3072, tied_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, num_layers=28, hidden_size=2048, num_heads=16, num_kv_heads=8,
                       ffn_hidden_size=6144, tied_embeddings=True),
    "qwen3-4b": dict(_QWEN3, num_layers=36, hidden_size=2560, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=9728, tied_embeddings=True),
    "qwen3-8b": dict(_QWEN3, num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=12288),
    "qwen3-32b": dict(_QWEN3, num_layers=64, hidden_size=5120, num_heads=64, num_kv_heads=8,
                      ffn_hidden_size=25600),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of width 768, top-8, every block sparse
    # (decoder_sparse_step 1, mlp_only_layers []); intermediate_size 6144 is unused.
    "qwen3-30b-a3b": dict(_QWEN3, family="qwen3_moe", num_layers=48, hidden_size=2048, num_heads=32,
                          num_kv_heads=4, ffn_hidden_size=6144,
                          moe=dict(num_experts=128, experts_per_token=8, expert_ffn_hidden_size=768,
                                   normalize_topk=True)),
    # google/gemma-2-{2b,9b,27b} config.json: head_dim 256 (128 at 27B), query_pre_attn_scalar,
    # attention soft-cap 50 and final-logit soft-cap 30, every other layer a 4096-token window.
    "gemma-2-2b": dict(_GEMMA2, num_layers=26, hidden_size=2304, num_heads=8, num_kv_heads=4,
                       ffn_hidden_size=9216, head_dim=256, query_pre_attn_scalar=256.0),
    "gemma-2-9b": dict(_GEMMA2, num_layers=42, hidden_size=3584, num_heads=16, num_kv_heads=8,
                       ffn_hidden_size=14336, head_dim=256, query_pre_attn_scalar=256.0),
    "gemma-2-27b": dict(_GEMMA2, num_layers=46, hidden_size=4608, num_heads=32, num_kv_heads=16,
                        ffn_hidden_size=36864, head_dim=128, query_pre_attn_scalar=144.0),
    # google/gemma-3-1b-pt config.json (gemma3_text) and the text_config of gemma-3-{4b,12b,27b}-pt
    # (the vision tower is not modelled): 5 sliding-window layers to 1 global, q/k RMSNorm, no
    # soft-capping; the multimodal checkpoints' vocabulary has 262,208 rows (image tokens).
    "gemma-3-1b": dict(_GEMMA3, num_layers=26, hidden_size=1152, num_heads=4, num_kv_heads=1,
                       ffn_hidden_size=6912, vocab_size=262144, max_positions=32768, sliding_window=512),
    "gemma-3-4b": dict(_GEMMA3, num_layers=34, hidden_size=2560, num_heads=8, num_kv_heads=4,
                       ffn_hidden_size=10240, rope_scaling=_GEMMA3_ROPE),
    "gemma-3-12b": dict(_GEMMA3, num_layers=48, hidden_size=3840, num_heads=16, num_kv_heads=8,
                        ffn_hidden_size=15360, rope_scaling=_GEMMA3_ROPE),
    "gemma-3-27b": dict(_GEMMA3, num_layers=62, hidden_size=5376, num_heads=32, num_kv_heads=16,
                        ffn_hidden_size=21504, head_dim=128, query_pre_attn_scalar=168.0,
                        rope_scaling=_GEMMA3_ROPE),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts of width 14336, top-2.
    "mixtral-8x7b": dict(family="mixtral", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=14336, vocab_size=32000, max_positions=32768,
                         rope_theta=1000000.0,
                         moe=dict(num_experts=8, experts_per_token=2, expert_ffn_hidden_size=14336)),
    # deepseek-ai/DeepSeek-V3 config.json: MLA (q_lora_rank 1536, kv_lora_rank 512, 128+64 q/k,
    # 128 v), 256 routed experts of width 2048 top-8 plus 1 shared, first 3 blocks dense (18432).
    # The multi-token-prediction module (num_nextn_predict_layers: 1, 14B) is not modelled: KD
    # runs the main model only.
    "deepseek-v3": dict(family="deepseek_v3", num_layers=61, hidden_size=7168, num_heads=128,
                        num_kv_heads=128, ffn_hidden_size=18432, vocab_size=129280, max_positions=163840,
                        rope_theta=10000.0, norm_eps=1e-6,
                        rope_scaling=dict(rope_type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                          mscale_all_dim=1.0, original_max_position_embeddings=4096),
                        mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                 qk_rope_head_dim=64, v_head_dim=128),
                        moe=dict(num_experts=256, experts_per_token=8, expert_ffn_hidden_size=2048,
                                 num_shared_experts=1, first_dense_layers=3, router_bias=True,
                                 routed_scaling_factor=2.5, expert_groups=8, topk_groups=4)),
}

# Parameter counts as their authors publish them. GPT-3's are rounded to two significant
# digits in the paper (Table 2.1); the Llama and Qwen counts are the model cards' figures.
PUBLISHED_PARAMS: dict[str, float] = {
    "gpt-1.3b": 1.3e9,
    "gpt-2.7b": 2.7e9,
    "gpt-6.7b": 6.7e9,
    "gpt-13b": 13.0e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-72b": 72.7e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    # Qwen3 model cards ("Number of Parameters"), given to 1-3 significant digits.
    "qwen3-0.6b": 0.6e9,
    "qwen3-1.7b": 1.7e9,
    "qwen3-4b": 4.0e9,
    "qwen3-8b": 8.2e9,
    "qwen3-32b": 32.8e9,
    "qwen3-30b-a3b": 30.5e9,
    # Gemma 2: the Hugging Face checkpoints' exact counts.
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    # Gemma 3 technical report, Table 1: embedding + non-embedding parameters (text model; the
    # 417M vision encoder of 4B-27B excluded).
    "gemma-3-1b": 302e6 + 698e6,
    "gemma-3-4b": 675e6 + 3209e6,
    "gemma-3-12b": 1012e6 + 10759e6,
    "gemma-3-27b": 1416e6 + 25600e6,
    # Mistral AI, "Mixtral of experts" (2023): 46.7B total.
    "mixtral-8x7b": 46.7e9,
    # DeepSeek-V3 technical report: 671B total (685B on Hugging Face includes the 14B MTP module).
    "deepseek-v3": 671e9,
}

# Parameters one token runs through, as published (MoE presets).
PUBLISHED_ACTIVE_PARAMS: dict[str, float] = {
    "qwen3-30b-a3b": 3.3e9,  # Qwen3-30B-A3B model card: 3.3B activated
    "mixtral-8x7b": 12.9e9,  # Mistral AI: 12.9B per token
    "deepseek-v3": 37e9,  # DeepSeek-V3 technical report: 37B activated
}


def preset(name: str) -> ModelSpec:
    key = name.lower()
    if key not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)} "
                         "(or give a path to a Hugging Face config.json)")
    return ModelSpec(name=key, **PRESETS[key])


def _need(cfg: dict, path: str, *keys: str) -> Any:
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    raise InputError(f"{path}: field '{keys[0]}' is missing (needed for a {cfg.get('model_type')} model)")


def _int(cfg: dict, path: str, *keys: str) -> int:
    v = _need(cfg, path, *keys)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{path}: field '{keys[0]}' must be an integer, got {v!r}"[:300])
    return v


def _float(cfg: dict, path: str, key: str, default: float) -> float:
    """An optional number (null means the default); anything else names the field."""
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{path}: field '{key}' must be a number, got {v!r}"[:300])
    return float(v)


def _flag(cfg: dict, path: str, key: str, default: bool) -> bool:
    """An optional JSON boolean: bool("false") would silently be True, so strings are errors."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{path}: field '{key}' must be true or false, got {v!r}"[:300])
    return v


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral",
              "qwen3_moe", "deepseek_v3")
"""Families with Llama's config keys (RMSNorm, rotary, gated MLP) and their own additions."""

# Gemma3TextConfig's defaults: the text_config of the multimodal gemma-3-{4b,12b,27b} checkpoints
# states only what differs from them.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                            sliding_window_pattern=6, tie_word_embeddings=True)
# Sliding-window layout of each family: Gemma 2 alternates (layer i slides when i is even), Gemma
# 3 has 5 local layers to 1 global; Mistral, Mixtral and Phi-3 slide on every layer when set.
_WINDOW_PATTERN = {"gemma2": 2, "gemma3_text": 6}


def _rope(cfg: dict, kind: str = "full_attention") -> dict:
    """Where the rotary base lives: top level (transformers < 5), or rope_parameters (flat, or per
    attention kind for Gemma 3)."""
    if cfg.get("rope_theta") is not None or not isinstance(cfg.get("rope_parameters"), dict):
        return cfg
    rp = cfg["rope_parameters"]
    return rp[kind] if isinstance(rp.get(kind), dict) else rp


def _window(cfg: dict, path: str, mt: str, layers: int) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern) as the config states them; a layer layout no
    ModelSpec pattern describes is refused rather than priced wrong."""
    if mt in ("llama", "qwen3_moe", "deepseek_v3"):
        return None, None
    if mt in ("qwen2", "qwen3"):
        if _flag(cfg, path, "use_sliding_window", False):
            raise InputError(f"{path}: use_sliding_window true (sliding-window layers from "
                             "max_window_layers) is not supported; set it false")
        return None, None
    w = cfg.get("sliding_window")
    if w is None:
        return None, None
    w = _int(cfg, path, "sliding_window")
    pattern = _WINDOW_PATTERN.get(mt)
    if mt == "gemma3_text" and cfg.get("sliding_window_pattern") is not None:
        pattern = _int(cfg, path, "sliding_window_pattern")
    types = cfg.get("layer_types")
    if isinstance(types, list):
        sliding = [t == "sliding_attention" for t in types]
        if len(sliding) != layers:
            raise InputError(f"{path}: layer_types lists {len(sliding)} layers but num_hidden_layers is {layers}")
        if not any(sliding):
            return None, None
        if all(sliding):
            return w, None
        gaps = [i + 1 for i, sl in enumerate(sliding) if not sl]
        n = gaps[0]
        if any(sl != bool((i + 1) % n) for i, sl in enumerate(sliding)):
            raise InputError(f"{path}: layer_types is not every {n}-th layer global; only that "
                             "sliding-window layout is supported")
        pattern = n
    if pattern is not None and pattern < 2:
        raise InputError(f"{path}: field 'sliding_window_pattern' must be at least 2, got {pattern}")
    return w, pattern


def _rope_scaling(cfg: dict, path: str) -> dict | None:
    """The config's rotary scaling: rope_scaling (transformers < 5), or a rope_parameters (of the
    global layers, for Gemma 3) whose rope_type is not "default"; "type" is read as "rope_type"."""
    rs = cfg.get("rope_scaling")
    if rs is None and isinstance(cfg.get("rope_parameters"), dict):
        rs = {k: v for k, v in _rope(cfg).items() if k != "rope_theta"}
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise InputError(f"{path}: field 'rope_scaling' must be an object, got {rs!r}"[:300])
    rs = {("rope_type" if k == "type" else k): v for k, v in rs.items() if v is not None}
    return None if rs.get("rope_type", "default") == "default" else rs


def _softcap(cfg: dict, path: str, key: str) -> float | None:
    v = _float(cfg, path, key, 0.0)
    return v or None


def _llama_like(cfg: dict, path: str, mt: str) -> tuple[dict, dict]:
    """ModelSpec keywords of a Llama-like config and the config key of each field (for errors)."""
    heads = _int(cfg, path, "num_attention_heads")
    kv = heads if cfg.get("num_key_value_heads") is None else _int(cfg, path, "num_key_value_heads")
    layers = _int(cfg, path, "num_hidden_layers")
    gemma = mt in ("gemma2", "gemma3_text")
    window, pattern = _window(cfg, path, mt, layers)
    kw = dict(
        name=str(path), family=mt, num_layers=layers,
        hidden_size=_int(cfg, path, "hidden_size"), num_heads=heads, num_kv_heads=kv,
        ffn_hidden_size=_int(cfg, path, "intermediate_size"), gated_mlp=True,
        vocab_size=_int(cfg, path, "vocab_size"),
        tied_embeddings=_flag(cfg, path, "tie_word_embeddings", gemma),
        max_positions=_int(cfg, path, "max_position_embeddings"), norm="rmsnorm",
        qkv_bias=_flag(cfg, path, "attention_bias", mt == "qwen2"),
        rope_theta=_float(_rope(cfg), path, "rope_theta", 10000.0),
        norm_eps=_float(cfg, path, "rms_norm_eps", 1e-6 if gemma else 1e-5),
        qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"),
        sliding_window=window, sliding_window_pattern=pattern, rope_scaling=_rope_scaling(cfg, path))
    if cfg.get("head_dim") is not None and mt != "deepseek_v3":
        kw["head_dim"] = _int(cfg, path, "head_dim")
    if gemma:
        kw["attn_logit_softcapping"] = _softcap(cfg, path, "attn_logit_softcapping")
        kw["final_logit_softcapping"] = _softcap(cfg, path, "final_logit_softcapping")
        if cfg.get("query_pre_attn_scalar") is not None:
            kw["query_pre_attn_scalar"] = _float(cfg, path, "query_pre_attn_scalar", 0.0)
    if mt == "gemma3_text":
        local = cfg.get("rope_local_base_freq")
        kw["rope_local_theta"] = (_float(cfg, path, "rope_local_base_freq", 10000.0) if local is not None
                                  else _float(_rope(cfg, "sliding_attention"), path, "rope_theta", 10000.0))
    if mt == "mixtral":
        kw["moe"] = dict(num_experts=_int(cfg, path, "num_local_experts"),
                         experts_per_token=_int(cfg, path, "num_experts_per_tok"),
                         expert_ffn_hidden_size=kw["ffn_hidden_size"])
    elif mt == "qwen3_moe":
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise InputError(f"{path}: dense blocks among the MoE blocks (decoder_sparse_step != 1 or "
                             "mlp_only_layers) are not supported")
        kw["moe"] = dict(num_experts=_int(cfg, path, "num_experts"),
                         experts_per_token=_int(cfg, path, "num_experts_per_tok"),
                         expert_ffn_hidden_size=_int(cfg, path, "moe_intermediate_size"),
                         normalize_topk=_flag(cfg, path, "norm_topk_prob", False))
    elif mt == "deepseek_v3":
        if cfg.get("moe_layer_freq", 1) != 1:
            raise InputError(f"{path}: moe_layer_freq != 1 (dense blocks among the MoE blocks) is not supported")
        q_lora = cfg.get("q_lora_rank")
        kw["mla"] = dict(q_lora_rank=None if q_lora is None else _int(cfg, path, "q_lora_rank"),
                         kv_lora_rank=_int(cfg, path, "kv_lora_rank"),
                         qk_nope_head_dim=_int(cfg, path, "qk_nope_head_dim"),
                         qk_rope_head_dim=_int(cfg, path, "qk_rope_head_dim"),
                         v_head_dim=_int(cfg, path, "v_head_dim"))
        kw["moe"] = dict(num_experts=_int(cfg, path, "n_routed_experts"),
                         experts_per_token=_int(cfg, path, "num_experts_per_tok"),
                         expert_ffn_hidden_size=_int(cfg, path, "moe_intermediate_size"),
                         num_shared_experts=0 if cfg.get("n_shared_experts") is None
                         else _int(cfg, path, "n_shared_experts"),
                         first_dense_layers=0 if cfg.get("first_k_dense_replace") is None
                         else _int(cfg, path, "first_k_dense_replace"),
                         router_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
                         normalize_topk=_flag(cfg, path, "norm_topk_prob", True),
                         routed_scaling_factor=_float(cfg, path, "routed_scaling_factor", 1.0),
                         expert_groups=1 if cfg.get("n_group") is None else _int(cfg, path, "n_group"),
                         topk_groups=1 if cfg.get("topk_group") is None else _int(cfg, path, "topk_group"))
    src = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads",
               num_kv_heads="num_key_value_heads", ffn_hidden_size="intermediate_size",
               max_positions="max_position_embeddings", norm_eps="rms_norm_eps",
               sliding_window_pattern="sliding_window_pattern", moe="num_experts_per_tok",
               rope_scaling="rope_scaling")
    return kw, src


def from_hf_config(cfg: dict, path: str = "config.json") -> ModelSpec:
    """Read a Hugging Face config dict (GPT-2, GPT-NeoX and the LLAMA_LIKE families; a multimodal
    Gemma 3 config is read as its text model)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt is None:
        raise InputError(f"{path}: field 'model_type' is missing")
    if not isinstance(mt, str):
        raise InputError(f"{path}: field 'model_type' must be a string, got {mt!r}"[:300])
    if mt == "gemma3":  # the multimodal checkpoint: its text model (the vision tower is not modelled)
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise InputError(f"{path}: model_type 'gemma3' needs a 'text_config' object")
        cfg, mt = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None},
                   "model_type": "gemma3_text"}, "gemma3_text"
    name = str(path)
    # ModelSpec field -> the config.json key it came from, so errors name the user's key.
    src: dict[str, str] = {}
    if mt == "gpt2":
        h = _int(cfg, path, "n_embd")
        ffn = 4 * h if cfg.get("n_inner") is None else _int(cfg, path, "n_inner")
        kw = dict(
            name=name, family="gpt2", num_layers=_int(cfg, path, "n_layer"), hidden_size=h,
            num_heads=_int(cfg, path, "n_head"), num_kv_heads=_int(cfg, path, "n_head"),
            ffn_hidden_size=ffn, gated_mlp=False, vocab_size=_int(cfg, path, "vocab_size"),
            tied_embeddings=_flag(cfg, path, "tie_word_embeddings", True),
            max_positions=_int(cfg, path, "n_positions", "n_ctx"), norm="layernorm",
            learned_positions=True, norm_eps=_float(cfg, path, "layer_norm_epsilon", 1e-5))
        src = dict(num_layers="n_layer", hidden_size="n_embd", num_heads="n_head", num_kv_heads="n_head",
                   ffn_hidden_size="n_inner", max_positions="n_positions", norm_eps="layer_norm_epsilon")
    elif mt == "gpt_neox":
        heads = _int(cfg, path, "num_attention_heads")
        kw = dict(
            name=name, family="gpt_neox", num_layers=_int(cfg, path, "num_hidden_layers"),
            hidden_size=_int(cfg, path, "hidden_size"), num_heads=heads, num_kv_heads=heads,
            ffn_hidden_size=_int(cfg, path, "intermediate_size"), gated_mlp=False,
            vocab_size=_int(cfg, path, "vocab_size"),
            tied_embeddings=_flag(cfg, path, "tie_word_embeddings", False),
            max_positions=_int(cfg, path, "max_position_embeddings"), norm="layernorm",
            rope_theta=_float(cfg, path, "rotary_emb_base", 10000.0),
            norm_eps=_float(cfg, path, "layer_norm_eps", 1e-5))
        src = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads",
                   num_kv_heads="num_attention_heads", ffn_hidden_size="intermediate_size",
                   max_positions="max_position_embeddings", rope_theta="rotary_emb_base",
                   norm_eps="layer_norm_eps")
    elif mt in LLAMA_LIKE:
        kw, src = _llama_like(cfg, path, mt)
    else:
        raise InputError(f"{path}: model_type {mt!r} is not supported "
                         f"(supported: gpt2, gpt_neox, {', '.join(LLAMA_LIKE)}, gemma3)"[:300])
    try:
        return ModelSpec(**kw)
    except ValidationError as e:
        msg = str(explain_validation(e, path))
        loc = e.errors()[0].get("loc", ())
        if loc and str(loc[0]) in src:  # name the config.json key, not ModelSpec's
            msg = msg.replace(f"field '{loc[0]}'", f"field '{src[str(loc[0])]}'", 1)
        raise InputError(msg) from None


def _is(p: Path, test) -> bool:
    """Path.exists / is_dir that answer False for a name the OS cannot look up (ENAMETOOLONG:
    Python 3.11 raises there; a 300-character --teacher made `kdplan plan` exit 1)."""
    try:
        return test(p)
    except OSError:
        return False


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset name, a config.json path, or a directory holding config.json."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise InputError("model name is empty; give a preset name or a path to a config.json")
    p = Path(name_or_path)
    if name_or_path.lower() in PRESETS:
        return preset(name_or_path)
    if _is(p, Path.is_dir):
        p = p / "config.json"
    if p.suffix.lower() == ".json" or _is(p, Path.exists) or os.sep in name_or_path:
        data = parse_data(read_text(p), p, fmt=".json")  # config.json, whatever the file is called
        return from_hf_config(data, str(p))
    return preset(name_or_path)


def is_none(name: str | None) -> bool:
    return name is None or name.strip().lower() in ("none", "", "null")


# ---- the vocabulary KD distils over --------------------------------------------------------
# Tokenizer lineage of each family: models of one lineage whose embedding tables differ by less
# than VOCAB_PADDING ids share one tokenizer and only pad their tables to different multiples
# (Qwen2.5-7B: 152,064 rows, Qwen2.5-0.5B: 151,936, both for the same 151,665 tokens).
TOKENIZER_LINEAGE = {"gpt": "gpt2", "gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama",
                     "mistral": "mistral", "mixtral": "mistral", "qwen2": "qwen", "qwen3": "qwen",
                     "qwen3_moe": "qwen", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3",
                     "deepseek_v3": "deepseek_v3"}
VOCAB_PADDING = 1024
"""Largest difference between two tables of one tokenizer that padding explains (tables are
padded to multiples of 64-1024 rows for tensor-parallel and kernel alignment)."""


def _tokenizer_table(tokenizer_dir: str | Path) -> dict[str, int] | None:
    """Token -> id of a local tokenizer (its tokenizer.json: the model's vocabulary plus added
    tokens); None when the directory has no tokenizer.json."""
    p = Path(tokenizer_dir) / "tokenizer.json"
    if not p.is_file():
        return None
    data = parse_data(read_text(p), p, fmt=".json")
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {(v[0] if isinstance(v, list) else str(v)): i for i, v in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise InputError(f"{p}: no 'model.vocab' table; cannot count its tokens")
    table = dict(vocab)
    table.update({t["content"]: t["id"] for t in data.get("added_tokens") or []
                  if isinstance(t, dict) and isinstance(t.get("id"), int) and "content" in t})
    return table


def tokenizer_size(tokenizer_dir: str | Path) -> int | None:
    """Ids a local tokenizer defines (largest id + 1); None without a tokenizer.json."""
    table = _tokenizer_table(tokenizer_dir)
    return None if table is None else (max(table.values()) + 1 if table else 0)


def tokenizer_dir_of(source: str | None) -> Path | None:
    """The directory holding a model's tokenizer.json when the model was given as a checkpoint
    directory or its config.json (None for presets and bare config files)."""
    if not source or source.lower() in PRESETS:
        return None
    p = Path(source)
    d = p if p.is_dir() else p.parent
    return d if (d / "tokenizer.json").is_file() else None


def kd_vocab_size(teacher: ModelSpec, student: ModelSpec, tokenizer: str | None = None, *,
                  teacher_source: str | None = None, student_source: str | None = None) -> int:
    """The token ids [0, V) the KD loss compares over, or a DifferentTokenizers error (an
    InputError) saying why the two models cannot be distilled on logits.

    Rule: one tokenizer serves both models when (a) their tables are equal, or (b) their families
    are of one tokenizer lineage (TOKENIZER_LINEAGE: Qwen2/Qwen3/Qwen3-MoE, Gemma 2/3, Mistral/
    Mixtral, ...) and the tables differ by less than VOCAB_PADDING ids (padding to different
    multiples). Then KD runs over the shared ids: the smaller table, or the local tokenizer's real
    size when ``tokenizer`` (a directory with tokenizer.json) is given; that size must fit both
    tables. Anything else is two tokenizers, whose ids mean different tokens: refused. When both
    models were given as directories holding a tokenizer.json (``teacher_source`` /
    ``student_source``), the files decide instead: one token -> id table, whose size is then the
    shared vocabulary, or two, refused whatever the table sizes (Llama 2 and Mistral 7B both
    have 32,000 rows of different tokens). Each model still computes (and the cost model prices)
    its own full padded output projection."""
    vt, vs = teacher.vocab_size, student.vocab_size
    dirs = tokenizer_dir_of(teacher_source), tokenizer_dir_of(student_source)
    if all(dirs):
        ta, sa = _tokenizer_table(dirs[0]), _tokenizer_table(dirs[1])
        if ta != sa:
            diff = len(set(ta.items()) ^ set(sa.items()))
            raise DifferentTokenizers(f"teacher ({teacher.name}) and student ({student.name}) tokenizers differ "
                             f"({dirs[0]}/tokenizer.json vs {dirs[1]}/tokenizer.json: {diff} token ids differ); "
                             "KD on logits needs one tokenizer's ids")
        tokenizer = tokenizer or str(dirs[0])
    elif vt != vs:
        lt, ls = TOKENIZER_LINEAGE.get(teacher.family), TOKENIZER_LINEAGE.get(student.family)
        if lt != ls:
            raise DifferentTokenizers(f"teacher vocabulary ({vt}, {teacher.name}) and student vocabulary ({vs}, "
                             f"{student.name}) differ and come from different tokenizers ({teacher.family} "
                             f"vs {student.family}); KD on logits needs one tokenizer's ids")
        if abs(vt - vs) >= VOCAB_PADDING:
            raise DifferentTokenizers(f"teacher vocabulary ({vt}, {teacher.name}) and student vocabulary ({vs}, "
                             f"{student.name}) differ by {abs(vt - vs)} ids, more than padding explains "
                             f"(< {VOCAB_PADDING}): two different {lt} tokenizers; KD on logits needs one "
                             "tokenizer's ids")
    shared = min(vt, vs)
    if tokenizer is not None:
        n = tokenizer_size(tokenizer)
        if n is not None:
            if n > shared:
                raise InputError(f"tokenizer {tokenizer} has {n} tokens but the models' embedding "
                                 f"tables have {vt} (teacher) and {vs} (student) rows")
            shared = n
    return shared
