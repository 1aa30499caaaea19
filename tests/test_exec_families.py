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


def _hf_count(model) -> int:
    """Parameters, plus DeepSeek-V3's routing bias (a persistent buffer HF stores with them)."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(b.numel() for k, b in model.named_buffers() if k.endswith("e_score_correction_bias"))


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_builds_with_the_counted_parameters_and_runs(family):
    from executor.models import build_model, materialize
    from executor.pipeline import whole_model

    spec = tiny(family)
    meta = build_model(spec)
    assert type(meta).__name__.lower().startswith(family.split("_")[0].replace("gemma3", "gemma3"))
    assert _hf_count(meta) == spec.num_params()  # what ModelSpec counts is what transformers builds
    m = materialize(whole_model(meta), seed=1)
    assert not any(b.is_meta for b in m.buffers())
    ids = torch.randint(0, spec.vocab_size, (2, 24))
    logits = m(ids)
    assert logits.shape == (2, 24, spec.vocab_size) and torch.isfinite(logits).all()
    # Same seed, same weights: the seeded init does not depend on anything but the names.
    torch.testing.assert_close(materialize(whole_model(build_model(spec)), seed=1)(ids), logits)


def test_gemma2_soft_capping_and_sliding_window_are_applied():
    from executor.models import build_model, materialize
    from executor.pipeline import whole_model

    spec = tiny("gemma2")
    assert build_model(spec).config._attn_implementation == "eager"  # SDPA cannot soft-cap
    m = materialize(whole_model(build_model(spec)), seed=2)
    for p in m.parameters():  # large weights: logits would exceed the cap without it
        p.data.mul_(40)
    ids = torch.randint(0, spec.vocab_size, (1, 24))
    out = m(ids)
    assert out.abs().max() <= 30.0 + 1e-4 and out.abs().max() > 20
    # The same weights with a window covering the sequence: if the 8-token window were ignored
    # (the pipeline's block loop runs plain causal attention) the two would agree.
    wide = materialize(whole_model(build_model(spec.model_copy(update={"sliding_window": 64}))), seed=2)
    wide.load_state_dict(m.state_dict())
    torch.testing.assert_close(wide(ids[:, :8]), m(ids[:, :8]))  # within the window: identical
    assert not torch.allclose(wide(ids)[0, -1], out[0, -1], atol=1e-3)


def test_new_families_refuse_tensor_and_pipeline_parallelism():
    from executor.families import unsupported_layout

    for family in TINY:
        assert unsupported_layout(tiny(family), tp=1, pp=1, role="teacher") is None
        why = unsupported_layout(tiny(family), tp=2, pp=1, role="teacher")
        assert why and "tensor/pipeline parallelism" in why and "teacher.tp=1" in why
    assert unsupported_layout(from_hf_config(dict(BASE, model_type="llama")), tp=2, pp=2, role="student") is None
    why = unsupported_layout(tiny("mixtral"), tp=1, pp=1, role="teacher", forward_precision="fp8")
    assert why and "3-D" in why


def test_shared_vocab_logits_keeps_the_shared_ids():
    from executor.teacher import shared_vocab_logits

    t = torch.randn(5, 336)
    out = shared_vocab_logits(t, 320, 320)
    assert out.shape == (5, 320) and torch.equal(out, t[:, :320])
    out = shared_vocab_logits(t[:, :300], 300, 320)  # a smaller teacher table: the student's padding gets -inf
    assert torch.equal(out[:, :300], t[:, :300]) and torch.isneginf(out[:, 300:]).all()
    same = torch.randn(5, 320)
    assert shared_vocab_logits(same, 320, 320) is same


def test_padded_teacher_table_distils_over_the_shared_ids(tmp_path):
    """A teacher whose table is padded to 336 rows teaches exactly what the same teacher cut to the
    student's 320 rows teaches: same losses, step by step."""
    from exec_helpers import TEACHER, launch, layout, losses, make_plan, read_report, write_plan

    from executor.models import build_model, materialize, save_checkpoint

    padded_spec = TEACHER.model_copy(update={"vocab_size": 336})
    padded = materialize(build_model(padded_spec), seed=5)
    save_checkpoint(padded, tmp_path / "padded")
    cut = materialize(build_model(TEACHER), seed=5)
    with torch.no_grad():
        state = padded.state_dict()
        for k, v in cut.state_dict().items():
            v.copy_(state[k][: v.shape[0]] if state[k].shape != v.shape else state[k])
    save_checkpoint(cut, tmp_path / "cut")
    runs = {}
    for name, spec, vocab in (("padded", padded_spec, 320), ("cut", TEACHER, None)):
        plan = make_plan(tmp_path, layout(), teacher_ckpt=tmp_path / name)
        plan.teacher.model = spec
        plan.kd.vocab_size = vocab
        path = write_plan(tmp_path / f"{name}.json", plan)
        r = launch(path, 1, "--steps", 3, "--report", tmp_path / f"{name}.report.json",
                   "--output-dir", tmp_path / f"out-{name}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = losses(read_report(tmp_path / f"{name}.report.json"))
    assert runs["padded"] == pytest.approx(runs["cut"], rel=1e-6)


def test_rope_scaling_reaches_the_built_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from executor.models import build_model

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    spec = from_hf_config(dict(BASE, model_type="llama", rope_theta=500000.0, rope_scaling=scaling))
    ours = build_model(spec, device="cpu").model.rotary_emb
    ref = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in BASE.items()}, rope_theta=500000.0,
                                                       rope_scaling=scaling)).model.rotary_emb
    plain = build_model(spec.model_copy(update={"rope_scaling": None}), device="cpu").model.rotary_emb
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq)
    assert not torch.allclose(ours.inv_freq, plain.inv_freq)


def save_per_expert(m, path, family: str) -> None:
    """``m``'s weights as the published files store them: each expert separately (Qwen3-MoE /
    DeepSeek-V3: mlp.experts.N.{gate,up,down}_proj; Mixtral: block_sparse_moe.experts.N.{w1,w3,w2}
    and block_sparse_moe.gate), where transformers holds fused [E, ...] tensors."""
    from safetensors.torch import save_file

    from executor.models import full_state_dict

    names = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}.get(family, ("mlp", "gate_proj", "up_proj", "down_proj"))
    split = {}
    for k, v in full_state_dict(m).items():
        head = k.split(".mlp.")[0] + f".{names[0]}."
        if k.endswith("experts.gate_up_proj"):
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                split[f"{head}experts.{e}.{names[1]}.weight"] = v[e, :f].clone()
                split[f"{head}experts.{e}.{names[2]}.weight"] = v[e, f:].clone()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                split[f"{head}experts.{e}.{names[3]}.weight"] = v[e].clone()
        elif k.endswith("mlp.gate.weight"):
            split[f"{head}gate.weight"] = v
        elif not (k == "lm_head.weight" and m.config.tie_word_embeddings):
            split[k] = v
    path.mkdir(parents=True)
    save_file(split, str(path / "model.safetensors"))
    m.config.to_json_file(str(path / "config.json"))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_checkpoints_load_fused_or_per_expert(tmp_path, family):
    from executor.models import build_model, load_checkpoint, materialize, save_checkpoint

    spec = tiny(family)
    m = materialize(build_model(spec), seed=4)
    save_checkpoint(m, tmp_path / "fused")
    ids = torch.randint(0, spec.vocab_size, (1, 12))
    want = m(ids).logits
    torch.testing.assert_close(load_checkpoint(build_model(spec), tmp_path / "fused")(ids).logits, want)
    save_per_expert(m, tmp_path / "split", family)
    torch.testing.assert_close(load_checkpoint(build_model(spec), tmp_path / "split")(ids).logits, want)


def test_block_quantized_fp8_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    from executor.models import build_model, load_checkpoint

    (tmp_path / "fp8").mkdir()
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4),
               "model.layers.0.mlp.gate_proj.weight_scale_inv": torch.ones(1, 1)}, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(ValueError, match="dequantize"):
        load_checkpoint(build_model(tiny("deepseek_v3")), tmp_path / "fp8")
