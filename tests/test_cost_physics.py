"""Named physics terms of the cost model (issue 13 item 3): ZeRO-3/FSDP prefetch and unsharded
buffers by runtime, selective recomputation as each runtime does it. Planner-only (no torch)."""

import pytest

from kdplan.cost import comm
from kdplan.cost.compose import price_student
from kdplan.cost.memory import activation_bytes_per_layer, op_policy_bytes_per_layer
from kdplan.jobs import JobSpec, resolve
from kdplan.problem import Problem
from kdplan.models import preset
from kdplan.schema.compression import Compression
from kdplan.schema.plan import Layout

DENSE = Compression("dense")


def _problem(student="llama-3-8b", cluster="dgx-h100", gpus=8, seq_len=8192, global_batch=16, **overheads):
    p = resolve(JobSpec(teacher=None, student=student, cluster=cluster, gpus=gpus, seq_len=seq_len,
                        global_batch=global_batch))
    if overheads:
        ov = p.cluster.overheads.model_copy(update=overheads)
        p = Problem(job=p.job, teacher=None, student=p.student, cluster=p.cluster.model_copy(update={"overheads": ov}))
    return p


@pytest.mark.parametrize("gpus", [8, 128])
def test_llama3_8b_fsdp2_seq8192_selective_fits_as_measured(gpus):
    """Issue 13: Llama-3-8B, FSDP2, sequence 8,192, micro-batch 2, torchtitan's selective
    checkpointing on 8 and 128 H100 measured 67-82 GiB per GPU; the model predicted 87-102 GiB
    (activations 68 GiB, scores dropped but nothing else) and refused a layout that ran."""
    lay = Layout(tp=1, pp=1, dp=gpus, zero=3, micro_batch=2, recompute="selective", num_gpus=gpus)
    op = price_student(_problem(gpus=gpus, global_batch=2 * gpus, selective_recompute="op_policy"), lay,
                       compression=DENSE)
    core = price_student(_problem(gpus=gpus, global_batch=2 * gpus, selective_recompute="attention_core"), lay,
                         compression=DENSE)
    assert op.fits and 0.8 * 67 <= op.memory_gib <= 1.1 * 82, op.memory_gib
    assert op.memory_terms_gib["activations"] <= 0.6 * core.memory_terms_gib["activations"]
    # FSDP2's unsharded buffers: two blocks (or the root unit and a block) and one unit's gradients
    layer = preset("llama-3-8b").layer_params() * 2 / 2**30
    assert op.memory_terms_gib["gathered_params"] >= 2 * layer
    assert op.memory_terms_gib["unsharded_grads"] >= layer


def test_selective_policies_store_what_they_say():
    m = preset("llama-3-8b")
    kw = dict(b=2, s=4096, tp=1, q=2, flash=True)
    none = activation_bytes_per_layer(m, recompute="none", **kw)
    full = activation_bytes_per_layer(m, recompute="full", **kw)
    assert activation_bytes_per_layer(m, recompute="selective", selective="every_other_block", **kw) == (none + full) / 2
    # Megatron's selective only drops the scores, which a fused kernel never stores
    assert activation_bytes_per_layer(m, recompute="selective", selective="attention_core", **kw) == none
    op = activation_bytes_per_layer(m, recompute="selective", selective="op_policy", **kw)
    assert op == op_policy_bytes_per_layer(m, b=2, s=4096, tp=1, q=2) and full < op < none
    # by hand: Q + V (g/a) + attention output + fp32 lse + w1 output + w2 output + 2 residuals
    h, a, g, f, sbh = 4096, 32, 8, 14336, 4096 * 2 * 4096
    assert op == pytest.approx(2 * sbh * (2 + g / a) + 4 * 2 * a * 4096 + 2 * 4096 * 2 * f + 2 * sbh + 2 * 2 * sbh)


def test_the_default_runtime_prices_selective_as_the_executor_runs_it():
    # executor/parallelize.py apply_ac recomputes the attention core only (Korthikanti et al.);
    # torchtitan's every-other-block policy is a runtime option that sits between none and full
    lay = Layout(tp=1, pp=1, dp=8, zero=3, micro_batch=1, recompute="selective", num_gpus=8)
    p = _problem(seq_len=2048, global_batch=8)
    assert p.cluster.overheads.selective_recompute == "attention_core"
    q = _problem(seq_len=2048, global_batch=8, selective_recompute="every_other_block")
    sel = price_student(q, lay, compression=DENSE)
    none = price_student(q, lay.model_copy(update={"recompute": "none"}), compression=DENSE)
    full = price_student(q, lay.model_copy(update={"recompute": "full"}), compression=DENSE)
    assert full.compute_s > sel.compute_s > none.compute_s
    assert full.memory_terms_gib["activations"] < sel.memory_terms_gib["activations"] < none.memory_terms_gib["activations"]


def _z3(p, lay):
    pr = price_student(p, lay, compression=DENSE)
    return pr, pr.stages[0]


@pytest.mark.parametrize("runtime", ["fsdp", "deepspeed"])
def test_zero3_prefetch_exposes_only_what_outlasts_each_layer(runtime):
    """n layers of compute c and communication g per layer: a pass takes g + (n-1) max(c s, g) + c.
    FSDP's collectives cross nodes on all of a node's NICs (comm.allgather_time), DeepSpeed
    ZeRO-3's as one flat ring at each GPU's NIC share (comm.flat_allgather_time)."""
    lay = Layout(tp=1, pp=1, dp=64, zero=3, micro_batch=1, recompute="none", num_gpus=64)
    m = preset("llama-3-8b")
    n = m.num_layers
    collective = comm.allgather_time if runtime == "fsdp" else comm.flat_allgather_time
    for inter_gbps, slow in ((1e4, 1.0), (1e4, 1.3), (0.5, 1.1)):
        p = _problem(gpus=64, seq_len=4096, global_batch=64, overlap_slowdown=slow, zero3_runtime=runtime)
        node = p.cluster.groups[0].node
        node = node.model_copy(update={"inter_node": node.inter_node.model_copy(update={"bandwidth_gb_per_s": inter_gbps})})
        p = Problem(job=p.job, teacher=None, student=p.student,
                    cluster=p.cluster.model_copy(update={"groups": [p.cluster.groups[0].model_copy(update={"node": node})]}))
        pr, st = _z3(p, lay)
        fwd, bwd = st.busy_forward_s, st.busy_backward_s
        params = pr.memory_terms_gib["weights"] * 2**30 / 2 * 64  # this GPU's stage, unsharded
        g = collective(node, params * 2, 64, 1) / n
        r = collective(node, params * 2, 64, 1, op="reduce_scatter") / n
        expect = (g + (n - 1) * max(fwd / n * slow, g) + fwd / n - fwd
                  + g + (n - 1) * max(bwd / n * slow, g + r) + bwd / n + r - bwd)
        assert st.params_s == pytest.approx(expect, rel=1e-9)
        if inter_gbps > 1e3 and slow == 1.0:  # a fast link hides everything but the first gather and last scatter
            assert st.params_s == pytest.approx(2 * g + r, rel=1e-6)


def test_zero3_runtime_deepspeed_regathers_for_a_full_recompute():
    lay = Layout(tp=1, pp=1, dp=8, zero=3, micro_batch=1, recompute="full", num_gpus=8)
    fsdp = price_student(_problem(seq_len=2048, global_batch=8), lay, compression=DENSE)
    ds = price_student(_problem(seq_len=2048, global_batch=8, zero3_runtime="deepspeed"), lay, compression=DENSE)
    assert ds.bytes_per_step["params"] == pytest.approx(1.5 * fsdp.bytes_per_step["params"])
    assert "unsharded_grads" in fsdp.memory_terms_gib and "unsharded_grads" not in ds.memory_terms_gib
    assert ds.memory_terms_gib["gathered_params"] < fsdp.memory_terms_gib["gathered_params"]


def test_elementwise_overhead_is_charged_on_the_block_gemms_not_the_attention_core():
    """compute.elementwise_s: norms, activations and residuals are a share of the block's weight
    GEMMs; a fused (flash) attention core does its softmax inside the kernel and pays none of it.
    At 64K tokens the core is most of the block: charging it the share grew with s^2 (EasyContext)."""
    from kdplan.cost.compute import elementwise_s, layer_time
    from kdplan.profiles import load_hardware
    gpu = load_hardware("a100-80g")
    m = preset("llama-3-8b")
    frac = gpu.efficiency.elementwise_overhead_fraction
    assert frac > 0
    base = gpu.model_copy(update={"efficiency": gpu.efficiency.model_copy(update={"elementwise_overhead_fraction": 0.0})})
    for s, fused in ((2048, True), (65536, True), (4096, False)):
        lt = layer_time(m, gpu, "bf16", b=1, s=s, tp=1, fused_attention=fused)
        lt0 = layer_time(m, base, "bf16", b=1, s=s, tp=1, fused_attention=fused)
        gemms = lt0.forward_s - lt0.attn_core_s  # the block's weight GEMMs alone
        assert lt.attn_core_s == pytest.approx(lt0.attn_core_s, rel=1e-12)
        assert lt.forward_s - lt0.forward_s == pytest.approx(elementwise_s(gpu.efficiency, gemms), rel=1e-9)
        assert lt.forward_s == pytest.approx(gemms * (1 + frac) + lt.attn_core_s, rel=1e-9)


def test_recomputed_block_and_logits_are_not_live_together():
    """role.recomputed_block_peak_bytes: where each micro-batch's backward follows its forward on
    the stage (no pipeline, 1F1B), the logits are freed by the loss's and the vocabulary
    projection's backward before the last block is recomputed: the peak holds the larger of the
    two over the stored checkpoints, not their sum. GPipe and interleaved 1F1B hold both."""
    from kdplan.cost.role import recomputed_block_peak_bytes
    assert recomputed_block_peak_bytes(10.0, 4.0, schedule="1f1b", v=1) == 6.0
    assert recomputed_block_peak_bytes(10.0, 12.0, schedule="1f1b", v=1) == 0.0
    assert recomputed_block_peak_bytes(10.0, 4.0, schedule="gpipe", v=1) == 10.0
    assert recomputed_block_peak_bytes(10.0, 4.0, schedule="interleaved_1f1b", v=2) == 10.0
    # priced: a full-recompute student on one stage (Llama-3-8B, 8K tokens, dp 8)
    s = 8192
    p = _problem(seq_len=s, global_batch=8)
    m = p.student
    full, none = (price_student(p, Layout(tp=1, pp=1, dp=8, zero=3, micro_batch=1, recompute=rc, num_gpus=8),
                                compression=DENSE) for rc in ("full", "none"))
    gib = 2**30
    block = none.memory_terms_gib["activations"] / m.num_layers  # one block's working set (nothing recomputed)
    stored = m.num_layers * activation_bytes_per_layer(m, b=1, s=s, recompute="full") / gib
    logits = full.memory_terms_gib["logits"]
    assert 0 < block < logits  # a 128K vocabulary: the logits are the larger, the block adds nothing
    assert full.memory_terms_gib["activations"] == pytest.approx(stored, rel=1e-9)
    # a 32K vocabulary under a wide MoE block: the block is the larger (EasyContext's 700K row,
    # tests/test_validate.py, is the other side: block 16.2 GiB over logits 16.0)
    p = _problem(student="mixtral-8x7b", seq_len=4096, global_batch=8)
    m = p.student
    full, none = (price_student(p, Layout(tp=1, pp=1, dp=8, zero=3, micro_batch=1, recompute=rc, num_gpus=8),
                                compression=DENSE) for rc in ("full", "none"))
    block = none.memory_terms_gib["activations"] / m.num_layers
    stored = m.num_layers * activation_bytes_per_layer(m, b=1, s=4096, recompute="full") / gib
    logits = full.memory_terms_gib["logits"]
    assert 0 < logits < block
    assert full.memory_terms_gib["activations"] == pytest.approx(stored + block - logits, rel=1e-9)
