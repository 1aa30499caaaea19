"""How ``kdplan validate`` reads a published row (kdplan/cost/validate.py): each cell parsed exactly,
never by a substring of the whole row (issue 13, FlagPerf). Planner tests: no torch."""

import pytest

from kdplan.cost.validate import (EXTRA_CSV, build_case, read_rows, run_case, stated_block_ops,
                                  stated_fused_attention)


@pytest.fixture(scope="module")
def rows():
    return {r["row_id"]: r for r in read_rows(EXTRA_CSV)}


def test_a_row_that_says_no_flash_attention_is_priced_unfused(rows):
    """FLAG-BC2 (Baichuan2-13B) says "run WITHOUT flash-attention" and "(no flash-attn)": a substring
    test on "flash" read that as FlashAttention and dropped the s x s score traffic (-34% on its
    step time)."""
    for rid in ("FLAG-BC2-13B-01", "FLAG-BC2-13B-02"):
        assert stated_fused_attention(rows[rid]) is False
        case = build_case(rows[rid])
        assert case.problem.cluster.overheads.fused_attention is False
    assert stated_fused_attention(rows["FLAG-L2-7B-DS-01"]) is True  # "(flash-attention-2)"
    assert stated_fused_attention(rows["FLAG-PD-01"]) is True  # "flash_attention=True"
    assert stated_fused_attention(rows["FMS-T1-01"]) is True  # "SDPA FlashAttention-2 kernel"


@pytest.mark.parametrize("cell, expected", [
    ("DeepSpeed + HF Llama (flash-attention-2)", True),
    ("FlashAttention v2", True),
    ("torch SDPA", True),
    ("flash_attention=True; use_fused_rms_norm=True", True),
    ("run WITHOUT flash-attention (README)", False),
    ("Eager attention (no flash-attn) + recompute", False),
    ("flash_attention=False", False),
    ("not flash attention", False),
    ("eager attention", False),
    ("Megatron-LM, fused softmax", None),
    ("", None),
])
def test_attention_kernel_mentions_are_read_with_their_negation(cell, expected):
    assert stated_fused_attention({"framework": cell, "notes": ""}) is expected


def test_a_silent_row_keeps_its_runtime_default(rows):
    """A row that names no attention kernel: PyTorch's own stacks run SDPA (fused), others not."""
    row = dict(rows["FLAG-L2-7B-DS-01"])
    row["framework"] = "DeepSpeed 0.11.1 + HF transformers Llama"
    assert stated_fused_attention(row) is None
    assert build_case(row).problem.cluster.overheads.fused_attention is False


def test_a_shape_cell_with_a_note_keeps_its_number(rows):
    """Aquila2-7B's FFN cell is "11008 (inferred: swiglu with --multiple-of 256)": read as not stated it
    became 4h = 16384 and the four rows were priced 12-24% slow."""
    for i in range(1, 5):
        case = build_case(rows[f"FLAG-AQ2-7B-0{i}"])
        assert case.problem.student.ffn_hidden_size == 11008
        assert not any("ffn_hidden_size" in a for a in case.assumptions)


def test_the_precision_cell_is_read_by_its_leading_word(rows):
    """FLAG-L2-70B-01 trained in fp32 ("fp32 (README precision column; theoryflops set to 495T)"):
    priced as fp16 it came out 57% fast."""
    assert build_case(rows["FLAG-L2-70B-01"]).problem.job.precision == "fp32"
    assert build_case(rows["FLAG-L2-70B-02"]).problem.job.precision == "bf16"
    assert build_case(rows["FLAG-PD-01"]).problem.job.precision == "fp16"
    r32, r16 = run_case(build_case(rows["FLAG-L2-70B-01"])), run_case(build_case(rows["FLAG-L2-70B-02"]))
    assert r32.predicted_time_s > 1.6 * r16.predicted_time_s  # half the tensor-core peak, twice the bytes


def test_paddle_rows_without_fused_rms_norm_price_eager_norms(rows):
    """PaddleNLP's use_fused_rms_norm=False (the four A100-40GB LLaMA-7B rows) runs RMSNorm op by op
    in fp32: block_ops "eager" (its activation memory; its time through the runtime's
    eager_elementwise_passes)."""
    assert stated_block_ops(rows["FLAG-PD-05"]) == "eager"
    assert stated_block_ops(rows["FLAG-PD-01"]) == "fused"
    assert stated_block_ops(rows["FLAG-L3-8B-01"]) is None
    assert build_case(rows["FLAG-PD-05"]).problem.cluster.overheads.block_ops == "eager"
    assert build_case(rows["FLAG-PD-01"]).problem.cluster.overheads.block_ops == "fused"


def test_paddle_rows_borrow_the_paddle_runtime(rows):
    """FlagPerf's 20 Paddle rows run on PaddlePaddle's runtime allowances (profiles/clusters/paddle-a100.yaml:
    16-bit AMP O2 gradients, its per-block cost and runtime memory fitted on those rows), not on the
    dgx preset's defaults; the network stays the preset of the row's GPU."""
    for rid, gpu in (("FLAG-PD-01", "a100-80g"), ("FLAG-PD-05", "a100-40g")):
        case = build_case(rows[rid])
        assert case.runtime == "paddle-a100"
        assert case.problem.cluster.gpu_of_group(0).name == gpu
        assert case.problem.cluster.overheads.fp32_main_grads is False
    # sharding stage 1 vs 2 of one layout differ by the 16-bit gradient shard, as measured (4.72 GiB)
    z1, z2 = run_case(build_case(rows["FLAG-PD-02"])), run_case(build_case(rows["FLAG-PD-03"]))
    params = 6.74e9 / 2  # LLaMA-7B over tp 2
    assert z1.predicted_memory_gib - z2.predicted_memory_gib == pytest.approx(params * 2 * 3 / 4 / 2**30, rel=0.02)
