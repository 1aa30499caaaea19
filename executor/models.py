"""Hugging Face causal LMs for the executor: config from a ModelSpec, meta build, seeded materialisation,
safetensors load/save and the teacher/student vocabulary check.

Life cycle (torchtitan style): ``build_model(spec)`` on the meta device -> the runtime parallelises it
(DDP / FSDP2 / TP / PP stage) -> ``materialize(model, seed=...)`` or ``load_checkpoint(model, path)``
fills only the local shards. No rank ever holds a full model; each rank briefly holds one full
parameter at a time while it is initialised (generated on CPU, then sliced to its shard).

Family mapping: ``llama`` / ``mistral`` / ``qwen2`` build their own HF classes. ``gpt`` / ``gpt2`` /
``gpt_neox`` specs run as Llama modules (GPT-2's fused ``Conv1D`` cannot be tensor-parallelised by
DTensor styles) adapted to what the spec says, so that the model built is the model priced:
``gated_mlp = False`` -> a plain MLP (``up_proj``, GELU, ``down_proj``, biased in the GPT families);
``norm = "layernorm"`` -> LayerNorm; ``learned_positions`` -> ``model.embed_positions``; the GPT
families' attention biases. Its parameter count is the spec's (``ModelSpec.num_params``); rotary
position embedding still runs in attention (no parameters, a few elementwise ops per layer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from kdplan.schema import ModelSpec

# sdpa and eager both run on CPU and under DTensor TP (attention reshapes with -1 heads, and the
# attention kernel sees plain local tensors); sdpa is faster on CPU and avoids the [B, a, T, T]
# float32 score tensor of eager.
ATTN_IMPLEMENTATION = "sdpa"

# Wrapper prefixes that parallel wrappers insert into parameter names; stripped so that the seeded
# init and checkpoints key on the plain HF name whatever the layout.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def hf_config(spec: ModelSpec, *, dropout: float = 0.0) -> PretrainedConfig:
    """Hugging Face config for ``spec`` (see the module docstring for the family mapping)."""
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tied_embeddings,
        attention_dropout=dropout,
        use_cache=False,
    )
    if spec.family == "qwen2":
        cfg = Qwen2Config(**common)  # Qwen2 always has q/k/v bias
    elif spec.family == "mistral":
        cfg = MistralConfig(sliding_window=None, **common)
    else:
        cfg = LlamaConfig(attention_bias=spec.qkv_bias or spec.family in GPT_FAMILIES, mlp_bias=False, **common)
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    return cfg


GPT_FAMILIES = ("gpt", "gpt2", "gpt_neox")  # biased attention and MLP (kdplan.schema.ModelSpec counts)


class PlainMLP(nn.Module):
    """The non-gated transformer MLP: down_proj(gelu(up_proj(x))), named for the TP plan."""

    def __init__(self, hidden: int, ffn: int, *, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)
        self.act_fn = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def embed(inner: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token embedding (+ learned absolute positions when the model has them) of ids [B, T]."""
    h = inner.embed_tokens(ids)
    if getattr(inner, "embed_positions", None) is not None:
        h = h + inner.embed_positions(torch.arange(ids.shape[1], device=ids.device))
    return h


def _embed_with_positions(inner, args, kwargs):
    """Pre-hook of the HF model body: its own forward (pre-training) adds the learned positions too."""
    ids = kwargs.pop("input_ids", None) if not args else args[0]
    return (), {**kwargs, "inputs_embeds": embed(inner, ids)}


def _adapt_to_spec(model: nn.Module, spec: ModelSpec) -> None:
    """What the Llama modules lack for a GPT-style spec (see the module docstring)."""
    inner, h = model.model, spec.hidden_size
    bias = spec.family in GPT_FAMILIES
    for layer in inner.layers:
        if not spec.gated_mlp:
            layer.mlp = PlainMLP(h, spec.ffn_hidden_size, bias=bias)
        if spec.norm == "layernorm":
            layer.input_layernorm = nn.LayerNorm(h, eps=spec.norm_eps)
            layer.post_attention_layernorm = nn.LayerNorm(h, eps=spec.norm_eps)
    if spec.norm == "layernorm":
        inner.norm = nn.LayerNorm(h, eps=spec.norm_eps)
    if spec.learned_positions:
        inner.embed_positions = nn.Embedding(spec.max_positions, h)
        inner.register_forward_pre_hook(_embed_with_positions, with_kwargs=True)


def build_model(spec: ModelSpec, *, device="meta", dtype=torch.float32, dropout: float = 0.0) -> nn.Module:
    """An uninitialised HF causal LM for ``spec`` on ``device`` (meta by default: no memory)."""
    cfg = hf_config(spec, dropout=dropout)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        _adapt_to_spec(model, spec)
        model.to(dtype)
    return model


def param_key(name: str) -> str:
    """The plain HF name of a (possibly wrapped) parameter."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _full_init(name: str, shape, std: float, seed: int) -> torch.Tensor:
    """The full-size initial value of parameter ``name`` (float32, CPU), same on every rank."""
    if name.endswith("bias"):
        return torch.zeros(shape, device="cpu")
    if "norm" in name:  # RMSNorm / LayerNorm weights
        return torch.ones(shape, device="cpu")
    g = torch.Generator().manual_seed(_seed_for(seed, name))
    return torch.randn(shape, generator=g, device="cpu") * std


def _local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to the local shard of ``like`` (a DTensor) or returned as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        # src_data_rank=None: every rank already holds the same full tensor, so each slices its own
        # shard locally with no communication (works for Shard, Replicate and FSDP2+TP strided shards).
        dt = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return dt.to_local()
    return full


def _restore_rotary(model: nn.Module, device) -> None:
    """Recompute non-persistent rotary buffers, which ``to_empty`` leaves uninitialised."""
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(mod, bname, buf.to(device))


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _allocate(model: nn.Module, device) -> None:
    """``to_empty`` on a meta model; it replaces each parameter per module and so unties tied
    embeddings, which HF's ``tie_weights`` restores."""
    if _on_meta(model):
        model.to_empty(device=device)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()


@torch.no_grad()
def materialize(model: nn.Module, *, seed: int, device="cpu") -> nn.Module:
    """Allocate ``model`` (built on meta, possibly already parallelised) on ``device`` and fill it with
    a seeded init that gives the same full weights whatever the sharding.

    Each parameter's full value is drawn from a CPU generator seeded by sha256(seed, HF name) —
    normal(0, initializer_range) for matrices, ones for norms, zeros for biases (HF's Llama init) —
    then cut to the local shard with DTensor's own slicing, so DDP, FSDP2, TP and PP stages built
    from the same spec hold identical weights.
    """
    _allocate(model, device)
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    for name, p in model.named_parameters():
        full = _full_init(param_key(name), tuple(p.shape), std, seed)
        _local(p).copy_(_local_slice(full, p).to(p.dtype))
    _restore_rotary(model, device)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t.data


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    import safetensors

    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded HF checkpoint
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    with safetensors.safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _local_region(p: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the full tensor this rank holds, for a plain tensor (all of it) or a DTensor
    whose placements are plain Shard / Replicate; None for anything else (FSDP2+TP strided shards,
    partial): the caller then reads the full tensor and lets DTensor cut it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    if not all(type(pl) in (Shard, Replicate) for pl in p.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_checkpoint(model: nn.Module, path, *, device="cpu", transform=None) -> nn.Module:
    """Fill ``model`` (meta or allocated, possibly parallelised) from a local HF directory with
    safetensors. Each rank reads only its own block of each tensor (``safe_open`` + ``get_slice``),
    in the stored dtype, converted straight to the parameter's dtype: never the whole checkpoint,
    never an fp32 copy of a bf16 model (a 70B teacher on 8 GPUs read 8 x 140 GB before).
    ``transform(key, full tensor)``, when given, rewrites each full tensor before it is sharded (the
    fake-quantized teacher, reference of the stored one: executor.quant.weight_transform; its
    per-output-channel scales need whole rows): that path reads one full parameter at a time, in
    fp32, then keeps the local shard. A quantized teacher loads through executor.quant.load_teacher."""
    import contextlib

    import safetensors

    path = Path(path)
    files = _checkpoint_files(path)
    _allocate(model, device)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = []
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safetensors.safe_open(str(f), framework="pt")) for f in sorted(set(files.values()))}
        for name, p in model.named_parameters():
            key = param_key(name)
            if key not in files and tied and key == "lm_head.weight":
                key = "model.embed_tokens.weight"
            if key not in files:
                missing.append(key)
                continue
            sl = handles[files[key]].get_slice(key)
            if tuple(sl.get_shape()) != tuple(p.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(sl.get_shape())}, the model expects {tuple(p.shape)}")
            region = None if transform is not None else _local_region(p)
            if region is not None:
                part = sl[region]  # only this rank's block, in the stored dtype
            else:
                full = sl[tuple(slice(0, n) for n in p.shape)]
                full = full if transform is None else transform(key, full.float())
                part = _local_slice(full.to(p.dtype), p)
            local = _local(p)
            local.copy_(part.to(device=local.device, dtype=local.dtype))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    _restore_rotary(model, device)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors keyed by HF name. A collective when the model holds DTensors:
    call it on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        out[param_key(name)] = t.cpu().contiguous()
    return out


def save_checkpoint(model: nn.Module, path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to ``path`` atomically (temp dir, then rename).

    A collective for distributed models (every rank must call it); only global rank 0 writes.
    Tied weights are stored once (as ``model.embed_tokens.weight``), as HF does.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    state = full_state_dict(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return Path(path)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        if dest.exists():  # replace atomically enough: move the old one aside first
            old = dest.with_name(f".{dest.name}.old{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_vocab(teacher_tokenizer, student_tokenizer) -> None:
    """Raise ValueError unless teacher and student map every token to the same id."""
    t, s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t == s:
        return
    only_t = sorted(set(t) - set(s))
    only_s = sorted(set(s) - set(t))
    moved = sorted(k for k in set(t) & set(s) if t[k] != s[k])
    parts = [f"teacher has {len(t)} tokens, student {len(s)}"]
    if only_t:
        parts.append(f"{len(only_t)} only in the teacher (e.g. {only_t[:3]})")
    if only_s:
        parts.append(f"{len(only_s)} only in the student (e.g. {only_s[:3]})")
    if moved:
        k = moved[0]
        parts.append(f"{len(moved)} with different ids (e.g. {k!r}: teacher {t[k]}, student {s[k]})")
    raise ValueError("teacher and student vocabularies differ: " + "; ".join(parts) + ". KD needs one shared tokenizer.")
