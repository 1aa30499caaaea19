"""Model families people distil today (issue 19): shared padded vocabularies, the HF configs of
Qwen3, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE and DeepSeek-V3, their presets' parameter counts."""

import json
from pathlib import Path

import pytest

from kdplan.errors import InputError
from kdplan.jobs import resolve
from kdplan.models import VOCAB_PADDING, kd_vocab_size, load_model_spec, preset
from kdplan.schema import JobSpec

ROOT = Path(__file__).resolve().parent.parent
QWEN25_05B = str(ROOT / "examples" / "configs" / "qwen2.5-0.5b" / "config.json")


# ---- vocabularies -----------------------------------------------------------------------------

def test_qwen25_05b_config_is_the_published_shape():
    m = load_model_spec(QWEN25_05B)
    assert (m.family, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_hidden_size,
            m.vocab_size, m.tied_embeddings) == ("qwen2", 896, 24, 14, 2, 4864, 151936, True)
    # Qwen2.5 model card: 0.49B parameters, 0.36B non-embedding.
    assert abs(m.num_params() / 0.49e9 - 1) < 0.01
    assert abs((m.num_params() - m.embedding_params()) / 0.36e9 - 1) < 0.015  # 0.36 given to 2 digits


def test_padded_tables_of_one_tokenizer_distil_over_the_smaller():
    t, s = preset("qwen2.5-7b"), load_model_spec(QWEN25_05B)
    assert (t.vocab_size, s.vocab_size) == (152064, 151936)
    assert kd_vocab_size(t, s) == 151936
    assert kd_vocab_size(s, t) == 151936
    p = resolve(JobSpec(teacher="qwen2.5-7b", student=QWEN25_05B, cluster="dgx-h100", gpus=8))
    assert p.kd_vocab_size == 151936


def test_local_tokenizer_gives_the_real_size(tmp_path):
    vocab = {f"t{i}": i for i in range(151643)}
    added = [{"id": 151643 + i, "content": f"<|x{i}|>"} for i in range(22)]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                         "added_tokens": added}))
    t, s = preset("qwen2.5-7b"), load_model_spec(QWEN25_05B)
    assert kd_vocab_size(t, s, str(tmp_path)) == 151665
    small = s.model_copy(update={"vocab_size": 151000})
    with pytest.raises(InputError, match="151665 tokens"):
        kd_vocab_size(small, small, str(tmp_path))


def test_different_tokenizers_are_refused_with_the_reason():
    with pytest.raises(InputError, match="different tokenizers .qwen2 vs llama"):
        kd_vocab_size(preset("qwen2.5-7b"), preset("llama-3.2-1b"))
    # One lineage, but tables further apart than padding: two tokenizers (Gemma 2 256k vs Gemma 3 262k).
    a = preset("qwen2.5-7b")
    b = a.model_copy(update={"vocab_size": a.vocab_size - VOCAB_PADDING})
    with pytest.raises(InputError, match="more than padding explains"):
        kd_vocab_size(a, b)
    # Equal tables are one id space whatever the family (tiny configs with a trained BPE).
    g = preset("gpt-1.3b")
    assert kd_vocab_size(g, g.model_copy(update={"family": "llama"})) == g.vocab_size


def test_plan_states_the_shared_vocabulary(kdplan_cli, tmp_path):
    out = tmp_path / "plan.json"
    r = kdplan_cli("plan", "--teacher", "qwen2.5-7b", "--student", QWEN25_05B, "--cluster", "dgx-h100",
                   "--gpus", "8", "-o", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["kd"]["vocab_size"] == 151936
    assert plan["teacher"]["model"]["vocab_size"] == 152064  # its own padded projection, priced
    assert "[0, 151,936)" in r.stdout


# ---- presets: published parameter counts -------------------------------------------------------
# (preset, total published, how many of its digits are given, source). Counts stated to few digits
# are allowed their rounding interval on top of 1%.
PUBLISHED = {
    "qwen3-0.6b": (0.6e9, 0.05e9, "Qwen3-0.6B model card: 0.6B, 0.44B non-embedding"),
    "qwen3-1.7b": (1.7e9, 0.05e9, "Qwen3-1.7B model card: 1.7B, 1.4B non-embedding"),
    "qwen3-4b": (4.0e9, 0.05e9, "Qwen3-4B model card: 4.0B, 3.6B non-embedding"),
    "qwen3-8b": (8.2e9, 0.05e9, "Qwen3-8B model card: 8.2B, 6.95B non-embedding"),
    "qwen3-32b": (32.8e9, 0.05e9, "Qwen3-32B model card: 32.8B, 31.2B non-embedding"),
    "qwen3-30b-a3b": (30.5e9, 0.05e9, "Qwen3-30B-A3B model card: 30.5B, 29.9B non-embedding, 3.3B activated"),
    "gemma-2-2b": (2_614_341_888, 0, "google/gemma-2-2b safetensors; Gemma 2 report: 2,024,517,888 non-embedding"),
    "gemma-2-9b": (9_241_705_984, 0, "google/gemma-2-9b safetensors; Gemma 2 report: 8,324,201,984 non-embedding"),
    "gemma-2-27b": (27_227_128_320, 0, "google/gemma-2-27b safetensors; Gemma 2 report: 26,047,480,320 non-embedding"),
    "gemma-3-1b": (1000e6, 0.5e6, "Gemma 3 report Table 1: 302M embedding + 698M non-embedding"),
    "gemma-3-4b": (3884e6, 0.5e6, "Gemma 3 report Table 1: 675M + 3,209M (417M vision encoder excluded)"),
    "gemma-3-12b": (11771e6, 0.5e6, "Gemma 3 report Table 1: 1,012M + 10,759M"),
    "gemma-3-27b": (27016e6, 0.5e6, "Gemma 3 report Table 1: 1,416M + 25,600M"),
    "llama-3.1-8b": (8.03e9, 0.005e9, "Llama 3.1 model card: 8.03B"),
    "llama-3.1-70b": (70.6e9, 0.05e9, "Llama 3.1 model card: 70.6B"),
    "mixtral-8x7b": (46.7e9, 0.05e9, "Mistral AI, 'Mixtral of experts' (2023): 46.7B total, 12.9B per token"),
    "deepseek-v3": (671e9, 0.5e9, "DeepSeek-V3 technical report: 671B total, 37B activated (MTP module excluded)"),
}
NON_EMBEDDING = {"qwen3-0.6b": (0.44e9, 0.005e9), "qwen3-1.7b": (1.4e9, 0.05e9), "qwen3-4b": (3.6e9, 0.05e9),
                 "qwen3-8b": (6.95e9, 0.005e9), "qwen3-32b": (31.2e9, 0.05e9), "qwen3-30b-a3b": (29.9e9, 0.05e9),
                 "gemma-2-2b": (2_024_517_888, 0), "gemma-2-9b": (8_324_201_984, 0),
                 "gemma-2-27b": (26_047_480_320, 0), "gemma-3-1b": (698e6, 0.5e6), "gemma-3-4b": (3209e6, 0.5e6),
                 "gemma-3-12b": (10759e6, 0.5e6), "gemma-3-27b": (25600e6, 0.5e6)}
ACTIVE = {"qwen3-30b-a3b": (3.3e9, 0.05e9), "mixtral-8x7b": (12.9e9, 0.05e9), "deepseek-v3": (37e9, 0.5e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_total_params_match_published(name):
    published, rounding, _source = PUBLISHED[name]
    n = preset(name).num_params()
    assert abs(n - published) <= 0.01 * published + rounding, (name, n, published)


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING))
def test_preset_non_embedding_params_match_published(name):
    published, rounding = NON_EMBEDDING[name]
    m = preset(name)
    n = m.num_params() - m.embedding_params() - m.hidden_size  # blocks only (the final norm: h)
    assert abs(n - published) <= 0.01 * published + rounding, (name, n, published)


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_moe_active_params_match_published(name):
    published, rounding = ACTIVE[name]
    m = preset(name)
    assert abs(m.active_params() - published) <= 0.01 * published + rounding, (name, m.active_params())
    assert m.active_params() < m.num_params() / 3  # memory holds every expert, FLOPs see few


def test_dense_models_are_all_active():
    for name in ("qwen3-8b", "gemma-2-9b", "llama-3.1-8b"):
        m = preset(name)
        assert m.active_params() == m.num_params()


def test_hand_count_deepseek_v3_mla_block():
    m = preset("deepseek-v3")
    h, a = 7168, 128
    q = h * 1536 + 1536 + 1536 * a * (128 + 64)  # q_a, its norm, q_b
    kv = h * (512 + 64) + 512 + 512 * a * (128 + 128)  # kv_a (with the rotary key), norm, kv_b
    o = a * 128 * h
    assert m.attention_params() == q + kv + o
    assert m.head_dim == 192
    assert m.moe_layers == 58
    expert = 3 * h * 2048
    assert m.moe_mlp_params() == 257 * expert + 256 * h + 256
    assert m.moe_mlp_params(active=True) == 9 * expert + 256 * h + 256


# ---- Hugging Face config.json of each family (the published values, transcribed) ----------------
HF = {
    "qwen3-8b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
                 "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
                 "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
                 "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                 "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
                 "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                      "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 2048,
                      "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
                      "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
                      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                      "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                      "use_sliding_window": False, "vocab_size": 151936},
    "gemma-2-9b": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
                   "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 42,
                   "num_key_value_heads": 8, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                   "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000},
    "gemma-3-1b": {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
                   "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
                   "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
                   "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                   "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
                   "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144},
    # The multimodal checkpoint states only what differs from Gemma3TextConfig's defaults.
    "gemma-3-27b": {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                    "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                                    "model_type": "gemma3_text", "num_attention_heads": 32,
                                    "num_hidden_layers": 62, "num_key_value_heads": 16,
                                    "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                    "sliding_window": 1024},
                    "vision_config": {"model_type": "siglip_vision_model"}},
    "mixtral-8x7b": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_act": "silu",
                     "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                     "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                     "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
                     "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                     "vocab_size": 32000},
    "deepseek-v3": {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                    "attention_bias": False, "first_k_dense_replace": 3, "hidden_act": "silu",
                    "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
                    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
                    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
                    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
                    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                     "type": "yarn"},
                    "rope_theta": 10000, "routed_scaling_factor": 2.5, "tie_word_embeddings": False,
                    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280},
}
PHI3_MINI = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
             "intermediate_size": 8192, "max_position_embeddings": 4096, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
             "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": 32064}

SHAPE = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
         "vocab_size", "tied_embeddings", "qkv_bias", "qk_norm", "sliding_window", "sliding_window_pattern",
         "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "moe", "mla",
         "rope_scaling")


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_config_reads_as_the_preset(name):
    from kdplan.models import from_hf_config
    got, want = from_hf_config(HF[name], f"{name}/config.json"), preset(name)
    assert {k: getattr(got, k) for k in SHAPE} == {k: getattr(want, k) for k in SHAPE}
    assert got.num_params() == want.num_params()


def test_phi3_mini_config():
    from kdplan.models import from_hf_config
    m = from_hf_config(PHI3_MINI, "phi3/config.json")
    assert (m.family, m.sliding_window, m.sliding_layers, m.head_dim) == ("phi3", 2047, 32, 96)
    # microsoft/Phi-3-mini-4k-instruct safetensors: 3,821,079,552 parameters.
    assert m.num_params() == 3_821_079_552


def test_sliding_layers_follow_each_family():
    assert preset("gemma-2-9b").sliding_layers == 21  # layers 0, 2, ..., 40
    assert preset("gemma-3-27b").sliding_layers == 62 - 10  # every 6th global
    assert preset("qwen3-8b").sliding_layers == 0


def test_layer_types_list_is_read_and_odd_layouts_refused():
    from kdplan.models import from_hf_config
    cfg = dict(HF["gemma-3-1b"], layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention"
                                              for i in range(26)])
    cfg.pop("sliding_window_pattern")
    assert from_hf_config(cfg).sliding_window_pattern == 6
    cfg["layer_types"] = ["full_attention"] + ["sliding_attention"] * 25
    with pytest.raises(InputError, match="layer_types"):
        from_hf_config(cfg)


@pytest.mark.parametrize("bad, match", [
    (dict(HF["qwen3-30b-a3b"], mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(HF["qwen3-8b"], use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
    (dict(HF["mixtral-8x7b"], num_experts_per_tok=9), "experts_per_token"),
    (dict(HF["deepseek-v3"], moe_layer_freq=2), "moe_layer_freq"),
    (dict(HF["gemma-2-9b"], head_dim="256"), "head_dim"),
])
def test_bad_family_configs_name_the_problem(bad, match):
    from kdplan.models import from_hf_config
    with pytest.raises(InputError, match=match):
        from_hf_config(bad, "x/config.json")


def test_unsupported_model_type_lists_the_families(kdplan_cli, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "falcon"}))
    r = kdplan_cli("plan", "--teacher", "qwen3-8b", "--student", str(p), "--cluster", "dgx-h100", "--gpus", "8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "gemma2" in r.stderr and "deepseek_v3" in r.stderr


# ---- cost model: active parameters, head_dim, windows, soft-capping, experts --------------------
from kdplan.cost import layer_flops, price_teacher  # noqa: E402
from kdplan.cost.compute import layer_time, logit_softcap_passes  # noqa: E402
from kdplan.cost.flops import attention_span_fraction, forward_flops  # noqa: E402
from kdplan.cost.memory import active_ffn_width  # noqa: E402
from kdplan.jobs import Problem  # noqa: E402
from kdplan.profiles import load_cluster  # noqa: E402
from kdplan.schema.compression import Compression  # noqa: E402
from kdplan.schema.plan import Layout  # noqa: E402


def test_moe_flops_count_the_active_experts_only():
    m, b, s = preset("mixtral-8x7b"), 2, 1024
    n, h = b * s, m.hidden_size
    lf = layer_flops(m, b=b, s=s)
    assert lf.mlp == pytest.approx(2 * n * (2 * 3 * h * 14336 + h * 8))  # top-2 experts + router
    # Forward FLOPs without the s^2 core are 2 x active parameters per token (embedding lookup aside).
    core = m.num_layers * lf.attn_core
    per_token = (forward_flops(m, b=b, s=s) - core) / n
    # no embedding lookup, no norms (not matmuls)
    blocks_and_head = m.active_params() - m.vocab_size * h - m.hidden_size - m.num_layers * m.norm_params()
    assert per_token == pytest.approx(2 * blocks_and_head, rel=1e-9)
    ds = preset("deepseek-v3")
    per_token = (forward_flops(ds, b=1, s=s) - ds.num_layers * layer_flops(ds, b=1, s=s).attn_core) / s
    assert per_token == pytest.approx(2 * (ds.active_params() - ds.vocab_size * ds.hidden_size), rel=1e-3)
    assert per_token < 2 * ds.num_params() / 10  # memory holds 18x what a token runs through


def test_head_dim_from_config_sizes_the_attention():
    m, n = preset("qwen3-0.6b"), 4096  # a*d = 2048 != h = 1024
    lf = layer_flops(m, b=1, s=n)
    assert lf.qkv == pytest.approx(2 * n * 1024 * (16 * 128 + 2 * 8 * 128))
    assert lf.out_proj == pytest.approx(2 * n * 16 * 128 * 1024)
    assert lf.attn_core == pytest.approx(4 * n * n * 16 * 128)


def test_sliding_windows_cut_the_attention_core():
    g2 = preset("gemma-2-9b")  # 21 of 42 layers within 4096 tokens
    assert attention_span_fraction(g2, 4096) == 1.0  # a window as long as the sequence changes nothing
    s, w = 8192, 4096
    assert attention_span_fraction(g2, s) == pytest.approx((21 + 21 * (2 * s * w - w * w) / s**2) / 42)
    full = g2.model_copy(update={"sliding_window": None, "sliding_window_pattern": None})
    assert layer_flops(g2, b=1, s=s).attn_core < layer_flops(full, b=1, s=s).attn_core
    g3 = preset("gemma-3-27b")  # 52 of 62 layers within 1024 tokens: at 32k the core shrinks ~5x
    assert attention_span_fraction(g3, 32768) < 0.25


def test_soft_capping_is_priced():
    cl = load_cluster("dgx-h100", 8)
    g2 = preset("gemma-2-9b")
    nocap = g2.model_copy(update={"attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert logit_softcap_passes(g2, train=True) > logit_softcap_passes(g2, train=False) > 0
    assert logit_softcap_passes(nocap, train=True) == 0
    gpu = cl.gpu_of_group(0)
    unfused = layer_time(g2, gpu, "bf16", b=1, s=4096, tp=1, fused_attention=False)
    fused = layer_time(g2, gpu, "bf16", b=1, s=4096, tp=1, fused_attention=True)
    assert unfused.forward_s > fused.forward_s

    def teacher_time(model):
        p = Problem(job=JobSpec(seq_len=4096, global_batch=8), teacher=model, student=preset("gemma-2-2b"),
                    cluster=cl)
        return price_teacher(p, Layout(dp=8, num_gpus=8), compression=Compression("dense")).time_s

    # Capped scores run unfused (eager attention), capped logits take passes over [tokens x V].
    assert teacher_time(g2) > teacher_time(nocap)


def test_moe_memory_holds_every_expert():
    cl = load_cluster("dgx-h100", 16)
    m = preset("qwen3-30b-a3b")
    p = Problem(job=JobSpec(seq_len=2048, global_batch=64), teacher=m, student=preset("qwen3-1.7b"), cluster=cl)
    for zero, dp in ((0, 16), (3, 16)):
        pr = price_teacher(p, Layout(dp=dp, zero=zero, num_gpus=16), compression=Compression("dense"))
        want = m.num_params() * 2 / (dp if zero == 3 else 1) / 2**30
        assert pr.memory_terms_gib["weights"] == pytest.approx(want, rel=1e-6), zero
    assert active_ffn_width(m) == 8 * 768
    assert active_ffn_width(preset("qwen3-8b")) == 12288


def test_moe_teacher_plans_with_its_expert_layout(kdplan_cli, tmp_path):
    out = tmp_path / "plan.json"
    r = kdplan_cli("plan", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-1.7b", "--cluster", "dgx-h100",
                   "--gpus", "16", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "experts" in r.stdout and "128 x 48 blocks, top-8" in r.stdout and "3.4 B active" in r.stdout
    plan = json.loads(out.read_text())
    assert plan["teacher"]["model"]["moe"]["num_experts"] == 128
    # MFU counts active parameters: with all 30.5B it would be ~9x higher than the active count gives.
    assert 0 < plan["prediction"]["mfu"] < 1


def test_student_expert_parallel_pin_is_refused(kdplan_cli):
    # teacher.ep is planned (tests/test_expert_parallel.py); a trained student's experts are not split
    r = kdplan_cli("plan", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-1.7b", "--cluster", "dgx-h100",
                   "--gpus", "16", "--fix", "student.ep=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "forward-only teacher only" in r.stderr and "student.zero=3" in r.stderr


def test_deepseek_v3_to_qwen3_logit_kd_is_refused_for_its_tokenizers(kdplan_cli):
    # Without a logit-KD pin the pair plans sequence-level KD (tests/test_sequence_kd.py).
    r = kdplan_cli("plan", "--teacher", "deepseek-v3", "--student", "qwen3-8b", "--cluster", "dgx-h200",
                   "--gpus", "64", "--fix", "kd.loss=forward_kl")
    assert r.returncode == 2 and "different tokenizers" in r.stderr and "Traceback" not in r.stderr


def test_moe_teacher_is_not_quantized():
    # The executor quantizes 2-D Linear weights; an MoE teacher's experts are 3-D tensors.
    p = resolve(JobSpec(teacher="qwen3-30b-a3b", student="qwen3-1.7b", cluster="dgx-h100", gpus=8,
                        teacher_precision="auto"))
    assert p.teacher_precisions == ("bf16",)
    with pytest.raises(InputError, match="mixture-of-experts"):
        resolve(JobSpec(teacher="qwen3-30b-a3b", student="qwen3-1.7b", cluster="dgx-h100", gpus=8,
                        teacher_precision="fp8"))


def test_rope_scaling_is_read_as_stated():
    from kdplan.models import from_hf_config
    assert preset("llama-3.1-8b").rope_scaling["rope_type"] == "llama3"
    assert preset("qwen3-8b").rope_scaling is None
    # transformers >= 5 writes rope_parameters (Gemma 3: per attention kind; the global layers' scaling)
    cfg = dict(HF["gemma-3-1b"], rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                     "rope_theta": 1e6},
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg.pop("rope_theta"), cfg.pop("rope_local_base_freq")
    m = from_hf_config(cfg)
    assert m.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert (m.rope_theta, m.rope_local_theta) == (1e6, 1e4)
    with pytest.raises(InputError, match="rope_scaling"):
        from_hf_config(dict(HF["qwen3-8b"], rope_scaling="yarn"))


def _tokenizer_dir(d: Path, vocab: dict, config: dict) -> str:
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": []}))
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_tokenizer_files_decide_when_both_models_have_them(tmp_path):
    llama2 = dict(HF["qwen3-8b"], model_type="llama", vocab_size=32000, head_dim=None)
    mistral = dict(llama2, model_type="mistral")
    a = _tokenizer_dir(tmp_path / "a", {f"a{i}": i for i in range(31990)}, llama2)
    b = _tokenizer_dir(tmp_path / "b", {f"b{i}": i for i in range(31990)}, mistral)
    c = _tokenizer_dir(tmp_path / "c", {f"a{i}": i for i in range(31990)}, mistral)
    ta, tb, tc = load_model_spec(a), load_model_spec(b), load_model_spec(c)
    assert kd_vocab_size(ta, tb) == 32000  # equal tables and no files looked at: accepted
    with pytest.raises(InputError, match="tokenizers differ"):  # the files show two tokenizers
        kd_vocab_size(ta, tb, teacher_source=a, student_source=b)
    assert kd_vocab_size(ta, tc, teacher_source=a, student_source=c + "/config.json") == 31990
    p = resolve(JobSpec(teacher=a, student=c, cluster="dgx-h100", gpus=8))
    assert p.kd_vocab_size == 31990
