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
