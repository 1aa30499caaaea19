"""Context parallelism (Layout.cp, ring attention; issue 13): the plan field and its GPU count,
older plans, what the cost model charges for a ring (compute and activations split over cp,
K/V transfers exposed only where they outlast the attention they overlap), the search's
candidates, EasyContext's ring rows priced by `kdplan validate`, and the executor's refusal.
Planner tier: no torch."""

import json

import pytest
from conftest import ROOT, run_kdplan

from kdplan.cost import comm, price_student, price_teacher
from kdplan.cost.compute import RING_GRAD_BYTES, layer_time
from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, run_case, summarize
from kdplan.jobs import load_job, resolve
from kdplan.planner import make_plan
from kdplan.schema import Plan
from kdplan.schema.capability import layout_unsupported, unsupported
from kdplan.schema.compression import Compression
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout
from kdplan.search.candidates import CP_MIN_SEQ_LEN, context_parallel_degrees, role_options
from kdplan.search.decode import finalize_layout

DENSE = Compression("dense")
TINY = "examples/tiny-cpu/job.toml"


def lay(tp=1, pp=1, dp=1, cp=1, b=1, **kw):
    return Layout(tp=tp, pp=pp, dp=dp, cp=cp, micro_batch=b, num_gpus=tp * pp * dp * cp, **kw)


def long_problem(seq=65536, batch=2, teacher=None, student="llama-3.1-8b", gpus=8, cluster="dgx-a100-80g"):
    return resolve(JobSpec(teacher=teacher, student=student, cluster=cluster, gpus=gpus, global_batch=batch,
                           seq_len=seq))


# ---- schema ---------------------------------------------------------------------------------

def test_the_gpu_count_is_tp_pp_dp_cp():
    lo = lay(tp=2, pp=2, dp=2, cp=2)
    assert lo.num_gpus == lo.gpus == 16 and lo.stage_gpus == 8
    # the cp ranks hold the same weights: ZeRO shards over the shard group's dp ranks times cp
    assert lay(dp=4, cp=2, zero=1).state_shards == 8
    assert Layout(dp=4, cp=2, zero=1, shard_group=2, num_gpus=8).state_shards == 4
    with pytest.raises(ValueError, match=r"tp\*pp\*dp\*cp = 2\*1\*2\*2 = 8 but num_gpus = 4"):
        Layout(tp=2, dp=2, cp=2, num_gpus=4)


def test_ranks_put_the_ring_between_tp_and_dp():
    """(pp, dp, cp, tp), tp innermost: a stage holds tp*dp*cp ranks."""
    lo = finalize_layout(lay(tp=2, pp=2, cp=2), num_layers=4, base=0, stage_layers=None, gpu_of=lambda r: "x")
    assert [s.ranks for s in lo.stages] == [[0, 1, 2, 3], [4, 5, 6, 7]] and lo.ranks == list(range(8))


@pytest.fixture(scope="module")
def tiny_cp_plan() -> Plan:
    return make_plan(resolve(load_job(TINY), pins=["student.cp=2"], job_path=TINY), top_k=0)


def test_a_cp_plan_round_trips_and_a_plan_from_before_cp_reads_as_cp_1(tiny_cp_plan):
    assert tiny_cp_plan.student.layout.cp == 2
    again = Plan.model_validate_json(tiny_cp_plan.model_dump_json())
    assert again.student.layout == tiny_cp_plan.student.layout
    old = json.loads((ROOT / "tests" / "golden" / "plans" / "seed.json").read_text())

    def drop_cp(x):
        if isinstance(x, dict):
            return {k: drop_cp(v) for k, v in x.items() if k != "cp"}
        return [drop_cp(v) for v in x] if isinstance(x, list) else x

    old = drop_cp(old) | {"schema_version": "1.7"}
    assert '"cp"' not in json.dumps(old)
    plan = Plan.model_validate(old)
    assert plan.schema_version == "1.7" and plan.student.layout.cp == 1 and plan.teacher.layout.cp == 1


def test_a_plan_whose_ring_cannot_cut_the_sequence_is_refused(tiny_cp_plan):
    """Zigzag cuts each sequence into 2*cp equal chunks: 128 tokens over cp = 3 cannot be."""
    data = tiny_cp_plan.model_dump(mode="json")
    data["student"]["layout"] |= {"cp": 3, "dp": 1, "num_gpus": 3, "ranks": [], "stages": []}
    with pytest.raises(ValueError, match=r"student\.layout\.cp = 3: .*6 equal chunks.*128"):
        Plan.model_validate(data)
    r = run_kdplan("plan", TINY, "--fix", "student.cp=3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "student.cp=3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---- cost -----------------------------------------------------------------------------------

def test_cp_2_halves_the_attention_compute_and_the_matmul_tokens():
    p = long_problem()
    gpu, m, s = p.cluster.gpu_of_group(0), p.student, 65536
    one = layer_time(m, gpu, "bf16", b=1, s=s, tp=1, cp=1)
    two = layer_time(m, gpu, "bf16", b=1, s=s, tp=1, cp=2)
    assert one.ring_merge_s == 0 and two.ring_merge_s > 0
    # the attention core of a rank: half the sequence's (within the size-efficiency change of
    # calls a quarter the size, which is negligible at 64K tokens)
    assert (two.attn_core_s - two.ring_merge_s) == pytest.approx(one.attn_core_s / 2, rel=1e-3)
    # the rest of the block (matmuls on half the tokens) about halves too
    rest = [(x.forward_s - x.attn_core_s) for x in (one, two)]
    assert rest[1] == pytest.approx(rest[0] / 2, rel=0.02)
    # the backward doubles the compute, not the ring's merges: it accumulates gradients instead
    assert two.backward_s == pytest.approx(2 * (two.device_forward_s - two.ring_merge_s) + two.ring_backward_s)


def test_cp_2_halves_activation_memory_and_reduces_gradients_over_dp_times_cp():
    p = long_problem()
    base, ring = (price_student(p, lay(dp=2, cp=c, recompute="full"), compression=DENSE) for c in (1, 2))
    for term in ("activations", "logits"):
        assert ring.memory_terms_gib[term] == pytest.approx(base.memory_terms_gib[term] / 2, rel=1e-12), term
    # same weights on the two cp ranks: their gradients are all-reduced like two more dp ranks'
    p4 = long_problem(batch=4)
    ring4, dp4 = (price_student(p4, lo, compression=DENSE) for lo in (lay(dp=2, cp=2), lay(dp=4)))
    assert ring4.bytes_per_step["gradients"] == pytest.approx(dp4.bytes_per_step["gradients"], rel=1e-12)
    assert ring4.comm_exposed_s.get("gradients") == pytest.approx(dp4.comm_exposed_s.get("gradients"), rel=1e-12)
    # ZeRO-3 over one sequence's ring: the states are sharded over the 8 cp ranks
    z3 = price_student(long_problem(batch=1), lay(cp=8, zero=3, recompute="full"), compression=DENSE)
    assert z3.memory_terms_gib["weights"] == pytest.approx(p.student.num_params() * 2 / 8 / 2**30, rel=1e-6)
    assert z3.fits and "context_parallel" in z3.bytes_per_step


def _teacher_ring(node_update=None, cp=4):
    """A forward-only teacher at 64K tokens on a cp-way ring: its price, and the exposed ring
    time recomputed from the formula (cp - 1 steps per block, each exposed by what its transfer
    outlasts 1/cp of the block's attention core)."""
    p = long_problem(teacher="llama-3.1-8b", student="llama-3.2-1b", batch=1)
    if node_update:
        g = p.cluster.groups[0]
        node = g.node.model_copy(update={"intra_node": g.node.intra_node.model_copy(update=node_update)})
        cl = p.cluster.model_copy(update={"groups": [g.model_copy(update={"node": node})]})
        p = type(p)(job=p.job, teacher=p.teacher, student=p.student, cluster=cl)
    lo = lay(cp=cp)
    pr = price_teacher(p, lo, compression=DENSE)
    m, node = p.teacher, p.cluster.groups[0].node
    lt = layer_time(m, p.cluster.gpu_of_group(0), "bf16", b=1, s=65536, tp=1, cp=cp)
    kv = 65536 / cp * 2 * m.num_kv_heads * m.head_dim * 2
    t_kv = node.intra_node.latency_us * 1e-6 + kv / (node.intra_node.bandwidth_gb_per_s * 1e9
                                                     * node.intra_node.efficiency)
    expect = m.num_layers * (cp - 1) * max(0.0, t_kv - lt.attn_core_s / cp)
    return pr, expect, m.num_layers * (cp - 1) * kv * cp


def test_ring_transfers_hide_under_the_attention_they_overlap_on_nvlink():
    pr, expect, sent = _teacher_ring()
    assert expect == 0.0 and "context_parallel" not in pr.comm_exposed_s
    assert pr.bytes_per_step["context_parallel"] == pytest.approx(sent)


def test_ring_transfers_are_exposed_where_they_outlast_the_attention():
    """At 0.5 GB/s a 4 MiB K/V block takes longer than 1/cp of a 64K block's attention."""
    pr, expect, _ = _teacher_ring({"bandwidth_gb_per_s": 0.5})
    assert expect > 0
    assert pr.comm_exposed_s["context_parallel"] == pytest.approx(expect, rel=1e-9)


def test_the_backward_sends_fp32_gradients_of_the_blocks_back_around_the_ring():
    p = long_problem(batch=1)
    pr = price_student(p, lay(cp=8, zero=3, recompute="none"), compression=DENSE)
    m = p.student
    kv_elems = 65536 / 8 * 2 * m.num_kv_heads * m.head_dim
    per_block = 7 * kv_elems * 2 + 7 * kv_elems * 2 + 8 * kv_elems * RING_GRAD_BYTES
    assert pr.bytes_per_step["context_parallel"] == pytest.approx(per_block * m.num_layers * 8)
    node = p.cluster.groups[0].node
    assert comm.ring_exchange_time(node, 1e6, 8, 1) == pytest.approx(
        node.intra_node.latency_us * 1e-6 + 1e6 / (node.intra_node.bandwidth_gb_per_s * 1e9 * node.intra_node.efficiency))
    # a ring through two nodes steps at the inter-node hop
    assert comm.ring_exchange_time(node, 1e6, 16, 1) > comm.ring_exchange_time(node, 1e6, 8, 1)


def test_ring_attention_needs_a_fused_attention_kernel():
    p = long_problem(cluster="selene-a100-80g")  # Megatron of the SC21 paper: unfused attention
    pr = price_student(p, lay(cp=2, dp=2, recompute="full"), compression=DENSE)
    assert not pr.fits and "cp=2" in pr.why and "fused" in pr.why


# ---- search ---------------------------------------------------------------------------------

def test_cp_is_explored_for_long_sequences_pinned_or_when_nothing_fits_without_it():
    assert context_parallel_degrees(8, 1, seq_len=4096, gpus_per_node=8) == [1]
    assert context_parallel_degrees(8, 1, seq_len=CP_MIN_SEQ_LEN, gpus_per_node=8) == [1, 2, 4, 8]
    assert context_parallel_degrees(8, 2, seq_len=CP_MIN_SEQ_LEN, gpus_per_node=8) == [1, 2, 4]  # ring in a node
    assert context_parallel_degrees(8, 1, seq_len=4096, gpus_per_node=8, fallback=True) == [2, 4, 8]
    assert context_parallel_degrees(8, 1, seq_len=4096, gpus_per_node=8, pinned=8) == [8]
    assert context_parallel_degrees(8, 1, seq_len=4096, gpus_per_node=8, pinned=3) == []
    p = long_problem(seq=2048)
    short = role_options(p.student, "student", 8, gpus_per_node=8, global_batch=8, memory_gib=80, pins={},
                         seq_len=2048)
    assert short and all(o.layout.cp == 1 for o in short)
    # tp and pp pinned to 1 and 5 GiB per GPU: Llama-3.2-1B's 16K-token activation floor alone
    # (5.3 GB) does not fit whole, so the search falls back to rings (0.7 GB at cp = 8)
    pins = {"student.tp": 1, "student.pp": 1}
    kw = dict(gpus_per_node=8, global_batch=8, memory_gib=5, pins=pins, seq_len=16384)
    opts = role_options(long_problem(seq=16384, student="llama-3.2-1b").student, "student", 8, **kw)
    assert opts and {o.layout.cp for o in opts} <= {2, 4, 8} and min(o.layout.cp for o in opts) >= 2


def test_the_planner_splits_a_128k_sequence_over_a_ring_and_marks_it_for_the_executor():
    plan = make_plan(long_problem(seq=131072, batch=8), top_k=0)
    lo = plan.student.layout
    assert lo.cp > 1 and lo.num_gpus == lo.gpus == 8
    assert plan.prediction.bytes_per_step["context_parallel"] > 0
    assert not plan.executor.runnable and "context_parallel" in [u.feature for u in unsupported(plan)]


# ---- validate and the executor's refusal -----------------------------------------------------

def test_validate_prices_every_easycontext_row_with_its_ring():
    rows = [r for r in read_rows(EXTRA_CSV) if r["source_id"] == "easycontext_2024"]
    results = {r["row_id"]: run_case(build_case(r)) for r in rows}
    assert len(results) == 5 and all(not x.skip and x.predicted_time_s for x in results.values())
    ring = [rid for rid, x in results.items() if " cp8 " in x.layout]
    assert ring == ["EZCTX-02", "EZCTX-03", "EZCTX-04", "EZCTX-05"]
    case = build_case(next(r for r in rows if r["row_id"] == "EZCTX-04"))
    assert (case.layout.dp, case.layout.cp, case.layout.zero, case.problem.job.seq_len) == (1, 8, 3, 524288)
    # longer sequences take longer (the s^2 attention), as measured
    times = [results[rid].predicted_time_s for rid in ring]
    assert times == sorted(times)
    # the source does not state the A100's memory size: priced on the 80 GB one, no fits verdict
    assert not any(x.fit_known for x in results.values())
    s = summarize(list(results.values()))[0]
    assert s.rows == 5 and s.time_rows == 5 and s.fit_rows == 0 and s.skipped == 0


def test_the_executor_refuses_cp_by_the_capability_table_in_one_line():
    u = layout_unsupported("student", lay(cp=2), long_problem().student)
    assert u.feature == "context_parallel" and u.field == "student.layout.cp"
    assert "\n" not in u.message and "--fix student.cp=1" in u.message
    assert layout_unsupported("student", lay(dp=2), long_problem().student) is None


def test_a_fits_verdict_without_the_gpu_memory_size_does_not_steer_the_fit():
    """EasyContext's A100s have no stated memory size: whether the model calls the 700K row out of
    memory on an 80 GB A100 is not evidence against the allocator reserve the fit sets."""
    import dataclasses

    from kdplan.cost.fit import objective
    rows = [r for r in read_rows(EXTRA_CSV) if r["source_id"] == "easycontext_2024"]
    results = [run_case(build_case(r)) for r in rows]
    flipped = [dataclasses.replace(x, predicted_fits=not x.predicted_fits) for x in results]
    assert objective(flipped) == objective(results)
    known = [dataclasses.replace(x, fit_known=True) for x in results]
    assert objective([dataclasses.replace(x, predicted_fits=False) for x in known]) > objective(known)
