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
    """n layers of compute c and communication g per layer: a pass takes g + (n-1) L(c, g) + c, where
    a layer under its collective takes g if that outlasts the slowed compute (g >= c s), else
    c + g (1 - 1/s): the compute slows only while the collective runs (role.overlapped_layer_s).
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
        def layer(c, x):
            return x if x >= c * slow else c + x * (1 - 1 / slow)
        expect = (g + (n - 1) * layer(fwd / n, g) + fwd / n - fwd
                  + g + (n - 1) * layer(bwd / n, g + r) + bwd / n + r - bwd)
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


def _with_elementwise(gpu, **update):
    return gpu.model_copy(update={"efficiency": gpu.efficiency.model_copy(update=update)})


def test_elementwise_work_is_priced_by_its_counted_bytes_not_on_the_attention_core():
    """compute.elementwise_s: the fused norms, activation, residual adds and rotary move
    fused_elementwise_elements per token at elementwise_bandwidth_fraction of the memory bandwidth;
    a fused (flash) attention core does its softmax inside the kernel and pays none of it. At 64K
    tokens the core is most of the block: a share of it grew with s^2 (EasyContext)."""
    from kdplan.cost.compute import fused_elementwise_elements, layer_time
    from kdplan.profiles import load_hardware
    gpu = load_hardware("a100-80g")
    m = preset("llama-3-8b")
    frac = gpu.efficiency.elementwise_bandwidth_fraction
    assert frac is not None and 0 < frac <= 1
    # counted by hand: 2 norms (2h each), 2 residual adds (3h each), SwiGLU (3f), rotary on q and k (GQA)
    h, f, kv = 4096, 14336, 8 * 128
    assert fused_elementwise_elements(m) == 10 * h + 3 * f + 2 * (h + kv)
    slower = _with_elementwise(gpu, elementwise_bandwidth_fraction=frac / 2)
    for s, tp, fused in ((2048, 1, True), (65536, 1, True), (4096, 2, False)):
        lt = layer_time(m, gpu, "bf16", b=1, s=s, tp=tp, fused_attention=fused)
        lt2 = layer_time(m, slower, "bf16", b=1, s=s, tp=tp, fused_attention=fused)
        assert lt2.attn_core_s == pytest.approx(lt.attn_core_s, rel=1e-12)
        # halving the bandwidth share doubles the elementwise seconds and nothing else
        ew = lt2.forward_s - lt.forward_s
        assert ew == pytest.approx(fused_elementwise_elements(m) * s / tp * 2 / (gpu.memory_bandwidth_gb_per_s * 1e9 * frac),
                                   rel=1e-9)


def test_elementwise_share_of_a_block_falls_with_the_hidden_size():
    """Memory-bound work grows with h per token where the matmuls grow with h^2: its share of a
    block is several times larger for a 1B model than for a 405B one (a fixed fraction of the GEMM
    time, the price before schema 1.11, charged both the same)."""
    from kdplan.cost.compute import elementwise_s, layer_time
    from kdplan.profiles import load_hardware
    gpu = load_hardware("a100-80g")

    def share(name):
        m = preset(name)
        lt = layer_time(m, gpu, "bf16", b=4, s=2048, tp=1)
        ew = elementwise_s(m, gpu, "bf16", tokens=4 * 2048, tp=1, block_gemm_s=0.0)
        return ew / (lt.forward_s - lt.attn_core_s - ew)

    small, big = share("llama-3.2-1b"), share("llama-3.1-405b")
    assert small > 3 * big and 0.002 < big < 0.05 and 0.02 < small < 0.3


def test_a_profile_of_the_older_elementwise_pricing_is_read_as_it_was_written():
    """Schema < 1.11 profiles carry only elementwise_overhead_fraction: their elementwise time stays
    that fraction of the block's weight GEMMs (and their head's 1 + it); setting both prices is refused."""
    from kdplan.cost.compute import head_elementwise_factor, layer_time
    from kdplan.profiles import load_hardware
    from kdplan.schema.cluster import ComputeEfficiency
    gpu = load_hardware("a100-80g")
    m = preset("llama-3-8b")
    old = _with_elementwise(gpu, elementwise_bandwidth_fraction=None, elementwise_overhead_fraction=0.2)
    none = _with_elementwise(gpu, elementwise_bandwidth_fraction=None, elementwise_overhead_fraction=0.0)
    lt, lt0 = (layer_time(m, g, "bf16", b=1, s=4096, tp=1) for g in (old, none))
    assert lt.forward_s - lt.attn_core_s == pytest.approx(1.2 * (lt0.forward_s - lt0.attn_core_s), rel=1e-9)
    assert head_elementwise_factor(old) == pytest.approx(1.2) and head_elementwise_factor(gpu) == 1.0
    assert ComputeEfficiency().legacy_elementwise_fraction == 0.1  # what an older file without the field meant
    with pytest.raises(ValueError, match="not both"):
        ComputeEfficiency(elementwise_bandwidth_fraction=0.8, elementwise_overhead_fraction=0.1)


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


def test_overlap_slowdown_lasts_only_as_long_as_the_collective():
    """role.overlapped_layer_s: compute slows by overlap_slowdown while a collective runs beside
    it, not for the whole layer. A 17 s ring-attention block (EasyContext, 700K tokens) under a
    10 ms gather was charged 10% of its compute; it is charged 10 ms x (1 - 1/1.1)."""
    from kdplan.cost.role import overlapped_layer_s
    c, slow = 17.0, 1.1
    assert overlapped_layer_s(c, 0.01, slow) == pytest.approx(c + 0.01 * (1 - 1 / slow))
    assert overlapped_layer_s(c, 0.01, slow) < c * 1.001
    assert overlapped_layer_s(c, 0.0, slow) == c
    assert overlapped_layer_s(c, 0.01, 1.0) == c  # no slowdown: the compute alone
    # the collective outlasts the slowed compute: the layer takes the collective's time
    assert overlapped_layer_s(1.0, 2.0, slow) == 2.0
    # continuous where the two meet (g = c * slowdown), and never shorter than either side
    g = 1.0 * slow
    assert overlapped_layer_s(1.0, g * (1 - 1e-9), slow) == pytest.approx(g, rel=1e-6)
    for x in (0.0, 0.3, 0.9, 1.1, 1.5):
        assert overlapped_layer_s(1.0, x, slow) >= max(1.0, x)
        assert overlapped_layer_s(1.0, x, slow) <= max(1.0 * slow, x)
