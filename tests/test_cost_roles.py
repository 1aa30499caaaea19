"""Role prices, composition and baselines: monotonic sanity and the contract the solver relies on."""

import dataclasses

import pytest

from kdplan.cost import Candidate, baselines, evaluate, price_student, price_teacher, price_transfer
from kdplan.jobs import resolve
from kdplan.schema.compression import Compression, parse_compression
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout, Prediction

DENSE = Compression("dense")


def problem(teacher="gpt-13b", student="gpt-1.3b", gpus=32, batch=512, cluster="dgx-a100-80g"):
    return resolve(JobSpec(teacher=teacher, student=student, cluster=cluster, gpus=gpus, global_batch=batch))


def lay(tp=1, pp=1, dp=1, b=1, **kw):
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch=b, num_gpus=tp * pp * dp, **kw)


@pytest.fixture(scope="module")
def seed():
    return problem()


def test_more_tensor_parallelism_less_memory_per_gpu(seed):
    mems = [price_student(seed, lay(tp=t, dp=8 // t, b=4), compression=DENSE).memory_gib for t in (1, 2, 4, 8)]
    assert mems == sorted(mems, reverse=True) and mems[0] > mems[-1]


def test_recompute_trades_memory_for_time(seed):
    prices = {rc: price_student(seed, lay(dp=32, b=8, recompute=rc), compression=DENSE)
              for rc in ("none", "selective", "full")}
    acts = [prices[rc].memory_terms_gib["activations"] for rc in ("none", "selective", "full")]
    # dgx-a100-80g runs fused attention: the score matrix is never stored, so selective = none
    assert acts[0] == acts[1] > acts[2]
    assert prices["full"].time_s > prices["selective"].time_s > prices["none"].time_s
    unfused = problem(cluster="selene-a100-80g")
    acts = [price_student(unfused, lay(dp=32, b=8, recompute=rc), compression=DENSE).memory_terms_gib["activations"]
            for rc in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]


def test_teacher_has_no_gradients_or_optimizer(seed):
    t = price_teacher(seed, lay(dp=32, b=4), compression=DENSE)
    s = price_student(seed, lay(dp=32, b=4), compression=DENSE)
    assert "gradients" not in t.memory_terms_gib and "optimizer" not in t.memory_terms_gib
    assert s.memory_terms_gib["gradients"] > 0 and s.memory_terms_gib["optimizer"] > 0
    assert all(st.backward_s == 0 for st in t.stages)
    # weights: 2 bytes per teacher parameter on every (unsharded) replica
    assert t.memory_terms_gib["weights"] == pytest.approx(seed.teacher.num_params() * 2 / 2**30, rel=1e-6)
    assert "gradients" not in t.bytes_per_step


def test_offloaded_teacher_weights_stream_over_pcie(seed):
    on_gpu = price_teacher(seed, lay(dp=32, b=4), compression=DENSE)
    off = price_teacher(seed, lay(dp=32, b=4, offload="weights"), compression=DENSE)
    assert off.memory_gib < on_gpu.memory_gib / 3
    assert off.bytes_per_step["offload"] > 0 and off.time_s >= on_gpu.time_s


def _with_host_link_shared(problem, shared: int):
    cl = problem.cluster
    groups = [g.model_copy(update={"node": g.node.model_copy(update={"gpus_per_host_link": shared})}) for g in cl.groups]
    return dataclasses.replace(problem, cluster=cl.model_copy(update={"groups": groups}))


def test_gpus_behind_one_host_uplink_split_it_while_they_stream():
    """DGX A100 pairs its GPUs behind PCIe switches (NodeSpec.gpus_per_host_link 2): an offloaded
    teacher streams its weights on every GPU at once, each at half its host link's rate. At
    micro-batch 1 the stream outlasts the forward, so every byte's extra time is exposed."""
    from kdplan.cost import comm

    p = problem(teacher="llama-3-70b", student="llama-3-8b", gpus=8, batch=64)
    node = p.cluster.groups[0].node
    assert node.gpus_per_host_link == 2
    assert comm.host_link(node, 8).bandwidth_gb_per_s == pytest.approx(node.host.bandwidth_gb_per_s / 2)
    assert comm.host_link(node, 1) == node.host  # a GPU streaming alone has the uplink to itself
    layout = lay(dp=8, b=1, offload="weights")
    shared = price_teacher(p, layout, compression=DENSE)
    own = price_teacher(_with_host_link_shared(p, 1), layout, compression=DENSE)
    m = shared.num_micro_batches
    per_gpu = shared.bytes_per_step["offload"] / (8 * m)  # one GPU's weights, streamed per micro-batch
    extra = m * (comm.link_time(comm.host_link(node, 8), per_gpu) - comm.link_time(node.host, per_gpu))
    assert extra > 0 and shared.offload_s - own.offload_s == pytest.approx(extra, rel=1e-6)
    assert shared.time_s - own.time_s == pytest.approx(extra, rel=1e-6)


def test_a_partial_node_shares_its_host_uplink_among_the_gpus_it_has():
    from kdplan.profiles import load_cluster
    from kdplan.schema.cluster import NodeSpec

    assert load_cluster("dgx-a100-80g", 1).groups[0].node.gpus_per_host_link == 1
    assert load_cluster("dgx-a100-80g", 4).groups[0].node.gpus_per_host_link == 2
    assert load_cluster("dgx-h100", 8).groups[0].node.gpus_per_host_link == 1  # not stated: its own
    node = load_cluster("dgx-a100-80g", 8).groups[0].node.model_dump()
    with pytest.raises(ValueError, match="gpus_per_host_link 16 > gpus_per_node 8"):
        NodeSpec(**{**node, "gpus_per_host_link": 16})


def test_indivisible_batch_is_priced_as_not_fitting(seed):
    p = price_student(seed, lay(dp=3, b=1), compression=DENSE)
    assert not p.fits and "not divisible" in p.why


def test_out_of_memory_says_where_and_what():
    p = problem(teacher="none", student="llama-3-70b", gpus=8)
    r = price_student(p, lay(dp=8, b=1), compression=DENSE)
    assert not r.fits
    assert "GiB on student pipeline stage 0" in r.why and "optimizer" in r.why


def test_topk_payload_is_smaller_than_dense(seed):
    st, te = lay(tp=1, dp=16, b=4), lay(tp=1, dp=16, b=4)
    dense = price_transfer(seed, Candidate(student=st, teacher=te, placement="disaggregated"))
    topk = price_transfer(seed, Candidate(student=st, teacher=te, placement="disaggregated",
                                          compression=parse_compression("topk:64:8")))
    assert 0 < topk.bytes_per_step < dense.bytes_per_step / 100
    assert topk.time_s < dense.time_s
    local = price_transfer(seed, Candidate(student=lay(dp=32, b=4), teacher=lay(dp=32, b=4)))
    assert local.bytes_per_step == 0


def test_composition_rules(seed):
    st, te = lay(dp=32, b=4), lay(dp=32, b=4)
    s = price_student(seed, st, compression=DENSE)
    t = price_teacher(seed, te, compression=DENSE)
    co = evaluate(seed, Candidate(student=st, teacher=te), with_baselines=False)
    assert isinstance(co, Prediction)
    assert co.step_time_s == pytest.approx(s.time_s + t.time_s + seed.cluster.overheads.step_overhead_s)
    assert co.memory.role == "teacher+student" and co.memory.largest_term
    dis = evaluate(seed, Candidate(student=lay(dp=16, b=4), teacher=lay(dp=16, b=4), placement="disaggregated"),
                   with_baselines=False)
    assert dis.bytes_per_step["teacher_outputs"] > 0 and set(dis.idle_s) == {"teacher", "student"}
    off = evaluate(seed, Candidate(student=st, teacher=None, mode="offline",
                                   compression=parse_compression("topk:64")), with_baselines=False)
    assert off.offline is not None and off.offline.teacher_pass_s_per_step > 0
    assert off.step_time_s < co.step_time_s


def test_naive_dp_of_a_70b_teacher_cannot_run():
    p = problem(teacher="llama-3-70b", student="llama-3.2-1b", gpus=16, batch=64)
    b = baselines(p)
    assert b.naive_dp.step_time_s is None and "does not fit" in b.naive_dp.reason
    assert b.mirror.step_time_s is not None and b.mirror.memory_per_gpu_gib <= 80
    assert baselines(p) is b  # cached per problem


def test_baselines_and_ratios_in_one_prediction(seed):
    pred = evaluate(seed, Candidate(student=lay(dp=32, b=4), teacher=lay(dp=32, b=4)))
    b = pred.baselines
    assert b.single_gpu.step_time_s > b.mirror.step_time_s
    assert pred.speedup_vs_single_gpu == pytest.approx(b.single_gpu.step_time_s / pred.step_time_s)
    assert pred.speedup_vs_mirror == pytest.approx(b.mirror.step_time_s / pred.step_time_s)
    assert pred.cost_per_million_tokens_usd > 0 and 0 < pred.mfu < 1


def test_pricing_is_memoised_for_the_solver(monkeypatch):
    """What keeps pricing fast enough for the solver, counted (the speed itself is measured by
    benchmarks/pricing_speed.py): a layout is priced once per problem, a repeat is a cache hit
    returning the same object, and the per-layer cost is computed once per (micro-batch, tp)
    shape however many layouts share it."""
    import importlib
    compose, role = (importlib.import_module(f"kdplan.cost.{m}") for m in ("compose", "role"))
    calls = {"price_role": 0, "layer_time": 0}

    def counting(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(compose, "price_role", counting("price_role", compose.price_role))
    monkeypatch.setattr(role, "layer_time", counting("layer_time", role.layer_time))
    lays = [lay(tp=t, pp=p, dp=32 // (t * p), b=b) for t in (1, 2, 4, 8) for p in (1, 2, 4) for b in (1, 2, 4)]
    fresh = problem()
    first = [price_student(fresh, x, compression=DENSE) for x in lays]
    assert calls["price_role"] == len(lays) == 36
    shapes = {(x.micro_batch, x.tp) for x in lays}
    assert 0 < calls["layer_time"] <= len(shapes) == 12
    again = [price_student(fresh, x, compression=DENSE) for x in lays]
    assert calls["price_role"] == len(lays) and calls["layer_time"] <= len(shapes)  # all cache hits
    assert all(a is b for a, b in zip(first, again))
    # another problem (another job) shares nothing: its prices are computed afresh
    price_student(problem(batch=256), lays[0], compression=DENSE)
    assert calls["price_role"] == len(lays) + 1


def test_breakdown_adds_up_to_the_step(seed):
    cands = [Candidate(student=lay(tp=2, pp=4, dp=4, b=2, zero=1), teacher=lay(tp=2, pp=4, dp=4, b=2)),
             Candidate(student=lay(tp=4, pp=2, dp=2, b=2, zero=3, recompute="full"),
                       teacher=lay(tp=8, pp=2, dp=1, b=2), placement="disaggregated"),
             Candidate(student=lay(pp=4, dp=8, virtual_stages=2, schedule="interleaved_1f1b"),
                       teacher=lay(pp=4, dp=8))]
    for c in cands:
        pred = evaluate(seed, c, with_baselines=False)
        assert sum(pred.breakdown_s.values()) == pytest.approx(pred.step_time_s, rel=1e-9)
        assert pred.bytes_per_step["pipeline"] > 0 and pred.bytes_per_step["gradients"] > 0


def test_interleaving_shrinks_the_bubble(seed):
    one = price_student(seed, lay(pp=4, dp=8), compression=DENSE)
    two = price_student(seed, lay(pp=4, dp=8, virtual_stages=2, schedule="interleaved_1f1b"), compression=DENSE)
    assert two.bubble_s == pytest.approx(one.bubble_s / 2, rel=0.05)


def test_a_layout_that_cannot_run_is_infeasible_not_a_crash(seed):
    from kdplan.errors import Infeasible
    with pytest.raises(Infeasible, match="not divisible"):
        evaluate(seed, Candidate(student=lay(dp=8, b=4), teacher=lay(dp=24, b=4), placement="disaggregated"))


def test_prices_follow_a_replaced_cluster():
    p = problem(teacher="none")
    before = price_student(p, lay(dp=32, b=4), compression=DENSE).time_s
    gpu = p.cluster.gpus["a100-80g"]
    slower = gpu.model_copy(update={"peak": gpu.peak.model_copy(update={"bf16_tflops": 156.0})})
    p.cluster = p.cluster.model_copy(update={"gpus": {"a100-80g": slower}})
    assert price_student(p, lay(dp=32, b=4), compression=DENSE).time_s > 1.5 * before


def test_stage_times_taken_apart_add_up(seed):
    """StageTime's parts (what the simulator replays) rebuild the slot the pipeline formula uses."""
    s = price_student(seed, lay(tp=2, pp=4, dp=4, b=2, zero=1), compression=DENSE)
    for i, x in enumerate(s.stages):
        assert x.forward_s + x.backward_s == pytest.approx(x.busy_forward_s + x.busy_backward_s + x.sends * x.p2p_s)
        assert x.sends == (i < 3) + (i > 0) and 0 < x.tp_s < x.busy_forward_s + x.busy_backward_s
        assert x.grad_reduce_s > 0  # dp 4: every stage reduces its gradients
    slots = [x.per_micro_batch_s for x in s.stages]
    assert s.bubble_s == pytest.approx(sum(slots) - max(slots))
    assert max(x.grad_reduce_s for x in s.stages) >= s.comm_exposed_s.get("gradients", 0.0)  # whole vs exposed
    # interleaved: the last rank's chunk 0 feeds the first rank's chunk 1 (2 v - 1 sends at the ends)
    v2 = price_student(seed, lay(pp=4, dp=8, virtual_stages=2, schedule="interleaved_1f1b"), compression=DENSE)
    assert [x.sends for x in v2.stages] == [3, 4, 4, 3]
    z3 = price_student(seed, lay(pp=2, dp=16, b=1, zero=3), compression=DENSE)
    assert z3.comm_exposed_s.get("params", 0.0) == pytest.approx(
        z3.num_micro_batches * max(z3.stages, key=lambda x: x.per_micro_batch_s).params_s)


def test_disaggregated_teacher_pays_its_pipeline_fill_once(seed):
    """A streaming teacher never flushes: the step takes its steady rate, not its fill."""
    st, te = lay(pp=4, dp=4, b=4), lay(tp=2, pp=4, dp=2, b=4)
    c = Candidate(student=st, teacher=te, placement="disaggregated")
    s = price_student(seed, st, compression=DENSE, placement="disaggregated")
    t = price_teacher(seed, te, compression=DENSE)
    x = price_transfer(seed, c)
    assert t.bubble_s > 0 and t.steady_time_s == pytest.approx(t.num_micro_batches * max(
        y.per_micro_batch_s for y in t.stages))
    step = evaluate(seed, c, with_baselines=False).step_time_s
    assert step == pytest.approx(max(t.steady_time_s, s.time_s) + x.exposed_s + seed.cluster.overheads.step_overhead_s)


def test_colocated_teacher_widens_every_slot_of_the_student_pipeline(seed):
    """Hand derivation: T per student micro-batch on each of p stages, m micro-batches, v chunks
    -> the pipeline m * (t + T) + (p - 1) (t + T) / v grows by T (m + (p - 1) / v)."""
    from kdplan.cost import colocated_teacher_s
    for v in (1, 2):
        st = lay(pp=4, dp=8, b=2, virtual_stages=v, schedule="interleaved_1f1b" if v > 1 else "1f1b")
        s = price_student(seed, st, compression=DENSE)
        t = price_teacher(seed, lay(dp=32, b=4), compression=DENSE)  # another layout: pp 1
        m, p = s.num_micro_batches, 4
        T = t.steady_time_s / m
        assert colocated_teacher_s(s, t, v) == pytest.approx(T * (m + (p - 1) / v), rel=1e-6)
        step = evaluate(seed, Candidate(student=st, teacher=lay(dp=32, b=4)), with_baselines=False).step_time_s
        x = price_transfer(seed, Candidate(student=st, teacher=lay(dp=32, b=4)))
        assert step == pytest.approx(s.time_s + T * (m + (p - 1) / v) + x.exposed_s
                                     + seed.cluster.overheads.step_overhead_s)
    # the mirror layout (same depth and micro-batch): stage-wise, which is the teacher's own
    # pipeline time when the slowest student stage also carries the slowest teacher stage
    st = lay(pp=4, dp=8, b=2)
    s, t = price_student(seed, st, compression=DENSE), price_teacher(seed, st, compression=DENSE)
    assert colocated_teacher_s(s, t) == pytest.approx(t.time_s, rel=0.02)


def test_loss_over_the_vocabulary_is_priced_by_its_passes(seed):
    """CE / KD / the teacher's top-k selection: fp32 passes over [tokens x V/tp] at the achieved
    memory bandwidth, on the last stage only, and shown apart in the breakdown."""
    from kdplan.cost.compute import CE_PASSES, DEFAULT_TOPK_PASSES, KD_PASSES
    gpu, ov = seed.cluster.gpu_of_group(0), seed.cluster.overheads
    topk = parse_compression("topk:64")
    L = lay(tp=2, pp=2, dp=8, b=2)
    elems = 2 * seed.job.seq_len * seed.student.vocab_size / 2  # b * s * V / tp

    def by_hand(passes):
        return elems * 4 * passes / (gpu.memory_bandwidth_gb_per_s * 1e9 * ov.loss_bytes_per_s_fraction)

    dense, sparse = (price_student(seed, L, compression=c) for c in (DENSE, topk))
    plain = price_student(problem(teacher="none"), L, compression=DENSE)
    for price, passes in ((plain, CE_PASSES), (sparse, CE_PASSES + KD_PASSES["topk"]),
                          (dense, CE_PASSES + KD_PASSES["dense"])):
        assert price.stages[0].loss_s == 0 and price.stages[1].loss_s == pytest.approx(by_hand(passes))
    assert dense.time_s > sparse.time_s > plain.time_s
    t_dense, t_topk = (price_teacher(seed, L, compression=c) for c in (DENSE, topk))
    assert t_dense.stages[1].loss_s == 0
    t_elems = 2 * seed.job.seq_len * seed.teacher.vocab_size / 2
    assert t_topk.stages[1].loss_s == pytest.approx(by_hand(DEFAULT_TOPK_PASSES) * t_elems / elems)
    assert t_topk.stages[1].busy_forward_s > t_dense.stages[1].busy_forward_s
    pred = evaluate(seed, Candidate(student=lay(dp=32, b=4), teacher=lay(dp=32, b=4)), with_baselines=False)
    assert pred.breakdown_s["loss"] > 0
    assert sum(pred.breakdown_s.values()) == pytest.approx(pred.step_time_s, rel=1e-9)


def test_comm_bytes_count_device_links_not_host_offload(seed):
    """comm_bytes_per_step is network / NVLink traffic: PCIe weight streaming stays in
    bytes_per_step["offload"] only (the plan and its baselines count alike)."""
    c = Candidate(student=lay(dp=32, b=4), teacher=lay(dp=32, b=4, offload="weights"))
    pred = evaluate(seed, c)
    assert pred.bytes_per_step["offload"] > 0
    assert pred.comm_bytes_per_step == pytest.approx(
        sum(v for k, v in pred.bytes_per_step.items() if k != "offload"))
    on_gpu = evaluate(seed, Candidate(student=lay(dp=32, b=4), teacher=lay(dp=32, b=4)), with_baselines=False)
    assert pred.comm_bytes_per_step == pytest.approx(on_gpu.comm_bytes_per_step)
    assert pred.comm_reduction_vs_naive_dp == pytest.approx(
        1 - pred.comm_bytes_per_step / pred.baselines.naive_dp.comm_bytes_per_step)


def test_mfu_on_a_mixed_cluster_uses_each_gpus_own_peak():
    """A pipeline over A100 and H100 stages: MFU is over the sum of the GPUs' own peaks (it came
    out above 100% when every GPU was given the student group's peak)."""
    from kdplan.cost import forward_flops, peak_flops, train_model_flops
    p = resolve(JobSpec(teacher="llama-3-8b", student="llama-3.2-1b", cluster="mixed-a100-h100", gpus=32,
                        global_batch=128, seq_len=4096))
    a100, h100 = (p.cluster.gpu_of_group(g) for g in (0, 1))
    assert peak_flops(h100, "bf16") > 2 * peak_flops(a100, "bf16")
    st = lay(pp=2, dp=8, b=1)
    for groups, disagg in (((0, 1), False), ((1, 1), True)):
        c = Candidate(student=st, teacher=lay(dp=8, b=1) if disagg else st, student_group=groups[0],
                      student_stage_groups=groups, teacher_group=0,
                      placement="disaggregated" if disagg else "colocated")
        pred = evaluate(p, c, with_baselines=False)
        n_a100 = 8 * groups.count(0) + (8 if disagg else 0)
        n_h100 = 8 * groups.count(1)
        peaks = n_a100 * peak_flops(a100, "bf16") + n_h100 * peak_flops(h100, "bf16")
        flops = (train_model_flops(p.student, sequences=128, s=4096)
                 + forward_flops(p.teacher, b=128, s=4096))
        assert 0 < pred.mfu < 1
        assert pred.mfu == pytest.approx(flops / (pred.step_time_s * peaks), rel=1e-9)


def test_teacher_topk_encoding_is_priced_per_k_from_the_device_profile(seed):
    """A profile's measured top-k table (GPUSpec.topk_passes) prices the teacher's encoding per k:
    interpolated in log2 k, flat beyond its ends; without one, the GPU default for every k."""
    from kdplan.cost.compute import DEFAULT_TOPK_PASSES, teacher_topk_passes
    gpu = seed.cluster.gpu_of_group(0)
    assert teacher_topk_passes(gpu, 16, 8192) == teacher_topk_passes(gpu, 1024, 50257) == DEFAULT_TOPK_PASSES
    cpu = gpu.model_copy(update={"topk_passes": {8192: {16: 20.0, 64: 50.0, 1024: 230.0}, 131072: {16: 30.0, 1024: 100.0}}})
    assert teacher_topk_passes(cpu, 16, 8192) == 20.0 and teacher_topk_passes(cpu, 64, 8192) == 50.0
    assert teacher_topk_passes(cpu, 8, 8192) == 20.0 and teacher_topk_passes(cpu, 4096, 8192) == 230.0
    assert teacher_topk_passes(cpu, 32, 8192) == pytest.approx(35.0)  # halfway in log2 k
    assert teacher_topk_passes(cpu, 256, 8192) == pytest.approx(50.0 + 180.0 * 2 / 4)
    # the nearest measured vocabulary in log V: 50,257 is nearer 131,072 than 8,192
    assert teacher_topk_passes(cpu, 1024, 50257) == 100.0 and teacher_topk_passes(cpu, 1024, 16000) == 230.0
    # through the role price: the teacher's loss term scales with the passes of its k
    import dataclasses
    name = seed.cluster.groups[0].node.gpu
    cpu = gpu.model_copy(update={"topk_passes": {seed.teacher.vocab_size: {16: 20.0, 64: 50.0, 1024: 230.0}}})
    slow = dataclasses.replace(seed, cluster=seed.cluster.model_copy(update={"gpus": {**seed.cluster.gpus, name: cpu}}))
    L = lay(dp=32, b=4)
    t16, t1024 = (price_teacher(slow, L, compression=parse_compression(c)).stages[0].loss_s for c in ("topk:16", "topk:1024"))
    assert t1024 / t16 == pytest.approx(230.0 / 20.0)
    with pytest.raises(ValueError, match="topk_passes"):
        gpu.model_validate(dict(gpu.model_dump(), topk_passes={8192: {0: 3.0}}))
