"""Model specs: presets and Hugging Face ``config.json`` files of the GPT-2, GPT-NeoX, Llama,
Mistral and Qwen2 families, read into one ``ModelSpec``.

Preset shapes come from the published configs (sources next to each); ``PUBLISHED_PARAMS`` holds
the parameter counts their authors publish, which a test checks ``ModelSpec.num_params`` against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InputError
from .io import explain_validation, parse_data, read_text
from .schema.model import ModelSpec

# GPT-3 paper (Brown et al. 2020, Table 2.1) shapes with GPT-2's 50,257-token vocabulary,
# learned positions, LayerNorm, plain 4h GeLU MLP, tied embeddings, 2048 context.
_GPT3 = dict(family="gpt", gated_mlp=False, vocab_size=50257, tied_embeddings=True,
             max_positions=2048, norm="layernorm", learned_positions=True)

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
                           max_positions=131072, rope_theta=500000.0),
    # meta-llama/Llama-3.2-1B / 3B config.json (tied embeddings)
    "llama-3.2-1b": dict(family="llama", num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=8192, vocab_size=128256, max_positions=131072,
                         tied_embeddings=True, rope_theta=500000.0),
    "llama-3.2-3b": dict(family="llama", num_layers=28, hidden_size=3072, num_heads=24, num_kv_heads=8,
                         ffn_hidden_size=8192, vocab_size=128256, max_positions=131072,
                         tied_embeddings=True, rope_theta=500000.0),
    # Qwen/Qwen2.5-7B and -72B config.json (bias on q/k/v)
    "qwen2.5-7b": dict(family="qwen2", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                       ffn_hidden_size=18944, vocab_size=152064, max_positions=131072,
                       qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6),
    "qwen2.5-72b": dict(family="qwen2", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                        ffn_hidden_size=29568, vocab_size=152064, max_positions=131072,
                        qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6),
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


def from_hf_config(cfg: dict, path: str = "config.json") -> ModelSpec:
    """Read a Hugging Face config dict (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt is None:
        raise InputError(f"{path}: field 'model_type' is missing")
    if not isinstance(mt, str):
        raise InputError(f"{path}: field 'model_type' must be a string, got {mt!r}"[:300])
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
    elif mt in ("llama", "mistral", "qwen2"):
        heads = _int(cfg, path, "num_attention_heads")
        kv = heads if cfg.get("num_key_value_heads") is None else _int(cfg, path, "num_key_value_heads")
        rope_cfg = cfg if cfg.get("rope_theta") is not None or not isinstance(cfg.get("rope_parameters"), dict) \
            else cfg["rope_parameters"]
        kw = dict(
            name=name, family=mt, num_layers=_int(cfg, path, "num_hidden_layers"),
            hidden_size=_int(cfg, path, "hidden_size"), num_heads=heads, num_kv_heads=kv,
            ffn_hidden_size=_int(cfg, path, "intermediate_size"), gated_mlp=True,
            vocab_size=_int(cfg, path, "vocab_size"),
            tied_embeddings=_flag(cfg, path, "tie_word_embeddings", False),
            max_positions=_int(cfg, path, "max_position_embeddings"), norm="rmsnorm",
            qkv_bias=_flag(cfg, path, "attention_bias", mt == "qwen2"),
            rope_theta=_float(rope_cfg, path, "rope_theta", 10000.0),
            norm_eps=_float(cfg, path, "rms_norm_eps", 1e-5))
        src = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads",
                   num_kv_heads="num_key_value_heads", ffn_hidden_size="intermediate_size",
                   max_positions="max_position_embeddings", norm_eps="rms_norm_eps")
    else:
        raise InputError(f"{path}: model_type {mt!r} is not supported "
                         "(supported: gpt2, gpt_neox, llama, mistral, qwen2)"[:300])
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
