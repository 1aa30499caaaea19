"""Runtime-dependent memory terms by hand (issue 13): the optimizer step's own allocations
(Overheads.optimizer_step_bytes) and eager Hugging Face norms / SwiGLU (Overheads.block_ops),
and which runtime a published row borrows. No torch."""

import pytest

from kdplan.cost.compose import price_student
from kdplan.cost.memory import GIB, activation_bytes_per_layer
from kdplan.cost.validate import runtime_like
from kdplan.models import preset
from kdplan.problem import Problem
from kdplan.profiles import load_cluster
from kdplan.schema.compression import Compression
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout


def test_eager_norms_and_swiglu_add_their_fp32_copies_and_the_activation_output():
    m = preset("llama-3-8b")
    assert m.norm == "rmsnorm" and m.gated_mlp
    b, s, h, f = 2, 1024, m.hidden_size, m.ffn_hidden_size
    for tp, sp in ((1, False), (2, False), (2, True)):
        kw = dict(b=b, s=s, tp=tp, sequence_parallel=sp, q=2, flash=True)
        extra = activation_bytes_per_layer(m, eager=True, **kw) - activation_bytes_per_layer(m, **kw)
        # two RMSNorms: an fp32 copy (4 B) + the normalised output (2 B) + the next matmul's input
        # (2 B) against the fused count's input + matmul input (2 + 2 B): 4 B per element each,
        # outside the tp region; SwiGLU's activation output inside it (2 B per f-wide element).
        assert extra == pytest.approx(2 * 4 * s * b * h / (tp if sp else 1) + 2 * s * b * f / tp)
    kw = dict(b=b, s=s, q=2, flash=True)
    full = activation_bytes_per_layer(m, recompute="full", eager=True, **kw)
    assert full == activation_bytes_per_layer(m, recompute="full", **kw)  # only the block input is kept
    gpt = preset("gpt-1.3b")  # LayerNorm (one fused kernel) and a GELU MLP: nothing more is stored
    assert activation_bytes_per_layer(gpt, eager=True, **kw) == activation_bytes_per_layer(gpt, **kw)


def _problem(step_bytes: float):
    model = preset("gpt-1.3b")
    cluster = load_cluster("dgx-a100-80g", 8)
    cluster = cluster.model_copy(update={"overheads": cluster.overheads.model_copy(
        update={"optimizer_step_bytes": step_bytes})})
    job = JobSpec(teacher=None, student="gpt-1.3b", cluster=cluster.name, gpus=8, seq_len=1024, global_batch=16)
    return Problem(job=job, teacher=None, student=model, cluster=cluster)


@pytest.mark.parametrize("zero,offload,shard", [(0, "none", 1), (1, "none", 8), (3, "none", 8), (1, "optimizer", None)])
def test_optimizer_step_bytes_per_parameter_this_gpu_updates(zero, offload, shard):
    problem = _problem(10.0)
    lay = Layout(dp=8, zero=zero, micro_batch=2, num_gpus=8, offload=offload)
    terms = price_student(problem, lay, compression=Compression("dense")).memory_terms_gib
    params = terms["weights"] * GIB / 2 * (8 if zero >= 3 else 1)  # the stage's parameters (2 B each)
    if shard is None:  # the optimizer steps on the host
        assert "optimizer_step" not in terms
    else:
        assert terms["optimizer_step"] * GIB == pytest.approx(10 * params / shard)
    assert "optimizer_step" not in price_student(_problem(0.0), lay, compression=Compression("dense")).memory_terms_gib


def test_rows_borrow_the_runtime_their_framework_names():
    assert runtime_like({"framework": "InternEvo / InternLM (Hybrid ZeRO, PyTorch + FlashAttention + Apex)"}) == "internevo-a800"
    assert runtime_like({"framework": "DeepSpeed 0.11.1 + HF transformers Llama (flash-attention-2)"}) == "deepspeed-hf-a100"
    assert runtime_like({"framework": "Megatron-DeepSpeed"}) == "jean-zay-a100-80g"
    assert runtime_like({"framework": "Megatron-LM / megatron-core"}) == "selene-a100-80g"
    assert runtime_like({"framework": "PaddlePaddle 2.5.1"}) == "paddle-a100"
    assert runtime_like({"framework": "JAX / MaxText"}) is None
    hf = load_cluster("deepspeed-hf-a100").overheads
    assert hf.block_ops == "eager" and hf.zero3_runtime == "deepspeed" and hf.optimizer_step_bytes == 6


def _llama_problem(**overheads):
    model = preset("llama-3-8b")
    cluster = load_cluster("dgx-h100", 8)
    cluster = cluster.model_copy(update={"overheads": cluster.overheads.model_copy(update=overheads)})
    job = JobSpec(teacher=None, student="llama-3-8b", cluster=cluster.name, gpus=8, seq_len=2048, global_batch=32)
    return Problem(job=job, teacher=None, student=model, cluster=cluster)


def test_loss_fp32_logit_copies_add_four_bytes_per_logit_each():
    """Overheads.loss_fp32_logit_copies: Megatron-core 0.6 and PaddleNLP hold two fp32 copies of
    the [b, s, V/tp] logits at the loss (kdplan's executor one); a forward-only teacher none."""
    lay = Layout(tp=2, dp=4, zero=1, micro_batch=2, num_gpus=8)
    one = price_student(_llama_problem(), lay, compression=Compression("dense")).memory_terms_gib["logits"]
    two = price_student(_llama_problem(loss_fp32_logit_copies=2), lay,
                        compression=Compression("dense")).memory_terms_gib["logits"]
    m = preset("llama-3-8b")
    elems = 2 * 2048 * m.vocab_size / 2
    assert one * GIB == pytest.approx(elems * (2 + 4))
    assert two * GIB == pytest.approx(elems * (2 + 8))
    assert load_cluster("paddle-a100").overheads.loss_fp32_logit_copies == 2
    assert load_cluster("dgx-a100-80g").overheads.loss_fp32_logit_copies == 1


def test_megatron_core_rows_carry_its_loss_and_their_logits_grow_by_two_fp32_copies():
    """The FlagPerf rows that name Megatron-core 0.6 price its loss (two fp32 copies of the logits);
    Megatron-DeepSpeed's and FlagScale's (code not counted) keep one. Llama-3-8B tp2 pp1 (vocabulary
    128,256 over tp 2, sequence 8,192, micro-batch 1): 4 B x 8,192 x 64,128 = 1.96 GiB more."""
    from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, run_case

    rows = {r["row_id"]: r for r in read_rows(EXTRA_CSV)}
    core = build_case(rows["FLAG-L3-8B-02"])
    assert core.problem.cluster.overheads.loss_fp32_logit_copies == 2
    for rid in ("FLAG-L2-7B-MDS-01", "FLAG-AQ2-7B-01", "FLAG-L2-7B-DS-01"):
        assert build_case(rows[rid]).problem.cluster.overheads.loss_fp32_logit_copies == 1, rid
    one = core.problem.cluster.model_copy(update={"overheads": core.problem.cluster.overheads.model_copy(
        update={"loss_fp32_logit_copies": 1})})
    two = price_student(core.problem, core.layout, compression=Compression("dense")).memory_terms_gib["logits"]
    single = price_student(Problem(job=core.problem.job, teacher=None, student=core.problem.student, cluster=one),
                           core.layout, compression=Compression("dense")).memory_terms_gib["logits"]
    assert (two - single) * GIB == pytest.approx(4 * 8192 * 128256 / 2)
    assert run_case(core).predicted_fits
