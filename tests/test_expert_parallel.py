"""Expert parallelism of a forward-only MoE teacher in the planner (issue 19): the layout field
``ep``, its pins and refusals, the all-to-all it pays, the memory it saves, and the solver using
it where it is cheaper. No torch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kdplan.cost import forward_flops, price_teacher
from kdplan.cost.comm import alltoall_time, op_bandwidth
from kdplan.cost.flops import block_matmuls
from kdplan.cost.role import expert_alltoall_bytes
from kdplan.errors import InputError
from kdplan.jobs import resolve
from kdplan.models import preset
from kdplan.profiles import load_cluster
from kdplan.schema import JobSpec, Plan
from kdplan.schema.compression import Compression
from kdplan.schema.plan import Layout
from kdplan.search.candidates import expert_parallel_degrees, role_options

DENSE = Compression("dense")


def _problem(gpus=16, batch=512, teacher="qwen3-30b-a3b", student="qwen3-1.7b", cluster="dgx-h100"):
    return resolve(JobSpec(teacher=teacher, student=student, cluster=cluster, gpus=gpus, global_batch=batch))


# ---- schema: ep divides dp and the experts; dense models and students keep ep = 1 -------------

def test_layout_ep_must_divide_dp():
    assert Layout(dp=8, ep=4, num_gpus=8).ep == 4
    with pytest.raises(ValueError, match="ep=3 does not divide dp=8"):
        Layout(dp=8, ep=3, num_gpus=8)


def test_plan_refuses_ep_that_does_not_fit_the_model(tmp_path, kdplan_cli):
    out = tmp_path / "plan.json"
    r = kdplan_cli("plan", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-1.7b", "--cluster", "dgx-h100",
                   "--gpus", "16", "--fix", "teacher.ep=4", "-o", out)
    assert r.returncode == 0, r.stderr
    good = json.loads(out.read_text())
    assert good["teacher"]["layout"]["ep"] == 4  # the pin is honoured
    assert "expert parallel ep=4: 32" in r.stdout  # the summary shows the teacher's expert layout
    bad = json.loads(json.dumps(good))
    bad["teacher"]["model"]["moe"]["num_experts"] = 6  # 6 experts cannot be split 4 ways
    bad["teacher"]["model"]["moe"]["experts_per_token"] = 2
    with pytest.raises(ValueError, match=r"teacher\.layout\.ep = 4 does not divide .*6 routed experts"):
        Plan.model_validate(bad)
    dense = json.loads(json.dumps(good))
    dense["teacher"]["model"]["moe"] = None
    with pytest.raises(ValueError, match=r"teacher\.layout\.ep = 4: .* dense model"):
        Plan.model_validate(dense)
    student = json.loads(json.dumps(good))
    student["student"]["layout"]["ep"] = 2
    with pytest.raises(ValueError, match=r"student\.layout\.ep = 2: expert parallelism is planned for the forward-only"):
        Plan.model_validate(student)


@pytest.mark.parametrize("pin, needles", [
    ("teacher.ep=3", ["teacher.ep=3 does not divide", "128 routed experts"]),
    ("student.ep=2", ["student.ep=2", "forward-only teacher only"]),
])
def test_bad_ep_pins_exit_2_naming_the_field(kdplan_cli, pin, needles):
    r = kdplan_cli("plan", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-1.7b", "--cluster", "dgx-h100",
                   "--gpus", "16", "--fix", pin)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_ep_pins_refused_for_a_dense_teacher_and_with_zero3():
    with pytest.raises(InputError, match="teacher.ep=2: .* dense model"):
        resolve(JobSpec(teacher="qwen3-8b", student="qwen3-1.7b", cluster="dgx-h100", gpus=8, fix={"teacher.ep": "2"}))
    with pytest.raises(InputError, match="teacher.ep=2 with teacher.zero=3"):
        resolve(JobSpec(teacher="qwen3-30b-a3b", student="qwen3-1.7b", cluster="dgx-h100", gpus=8,
                        fix={"teacher.ep": "2", "teacher.zero": "3"}))
    # the cost model refuses it too (a plan file edited by hand), naming both fields
    p = _problem(8)
    pr = price_teacher(p, Layout(dp=8, ep=2, zero=3, num_gpus=8), compression=DENSE)
    assert not pr.fits and "ep=2 with zero=3" in pr.why


def test_candidates_enumerate_ep_for_moe_teachers_only():
    moe, dense = preset("qwen3-30b-a3b"), preset("qwen3-8b")
    assert expert_parallel_degrees(moe, 16) == [1, 2, 4, 8, 16]
    assert expert_parallel_degrees(moe, 12) == [1, 2, 4]  # 3, 6, 12 do not divide 128 experts
    assert expert_parallel_degrees(dense, 16) == [1]
    kw = dict(gpus_per_node=8, global_batch=64, memory_gib=80, seq_len=2048)
    eps = {o.layout.ep for o in role_options(moe, "teacher", 16, pins={}, **kw)}
    assert eps == {1, 2, 4, 8, 16}
    assert {o.layout.ep for o in role_options(moe, "teacher", 16, pins={"teacher.ep": 4}, **kw)} == {4}
    assert {o.layout.ep for o in role_options(moe, "student", 16, pins={}, **kw)} == {1}
    assert all(o.layout.zero == 0 for o in role_options(moe, "teacher", 16, pins={}, **kw) if o.layout.ep > 1)


# ---- cost: the all-to-all, by hand; memory per rank ------------------------------------------

def test_alltoall_bytes_and_time_are_the_formula_by_hand():
    p = _problem(16, batch=64)
    m, ov = p.teacher, p.cluster.overheads
    b, s, ep, dp = 2, 2048, 4, 16
    lay = Layout(dp=dp, ep=ep, micro_batch=b, num_gpus=16)
    pr = price_teacher(p, lay, compression=DENSE)
    # one rank's dispatch buffer: b*s tokens x top-8 x h = 2048 x 2 bytes, times the imbalance
    buf = b * s * 8 * 2048 * 2 * ov.expert_load_imbalance
    assert expert_alltoall_bytes(m, b=b, s=s, tp=1, q=2, imbalance=ov.expert_load_imbalance) == buf
    micro = 64 // (dp * b)  # micro-batches per rank per step
    # 2 all-to-alls (dispatch + combine) per MoE block, 48 blocks; each rank sends (ep-1)/ep of its buffer
    want = 2 * 48 * (ep - 1) / ep * buf * dp * micro
    assert pr.bytes_per_step["expert_parallel"] == pytest.approx(want, rel=1e-12)
    # ep=4 consecutive dp ranks sit in one node: NVLink, one message per peer
    link = p.cluster.groups[0].node.intra_node
    one = 3 * link.latency_us * 1e-6 + 3 / 4 * buf / op_bandwidth(link, "send_recv")
    assert alltoall_time(p.cluster.groups[0].node, buf, 4, 1) == pytest.approx(one, rel=1e-12)
    assert pr.comm_exposed_s["expert_parallel"] == pytest.approx(micro * 2 * 48 * one, rel=1e-9)
    # ep=16 spans the 2 nodes: the half bound for the other node crosses the network and binds
    node = p.cluster.groups[0].node
    inter = 8 * node.inter_node.latency_us * 1e-6 + 8 / 16 * buf / op_bandwidth(node.inter_node, "send_recv")
    assert alltoall_time(node, buf, 16, 1) == pytest.approx(inter, rel=1e-12)
    assert alltoall_time(node, buf, 16, 1) > alltoall_time(node, buf, 8, 1)
    # no expert parallelism, no all-to-all
    assert "expert_parallel" not in price_teacher(p, Layout(dp=16, micro_batch=b, num_gpus=16),
                                                  compression=DENSE).bytes_per_step


def test_memory_per_rank_falls_with_ep():
    p = _problem(16, batch=64)
    m = p.teacher
    routed = 48 * 128 * 3 * 2048 * 768  # every block's routed experts
    weights = []
    for ep in (1, 2, 4, 8, 16):
        pr = price_teacher(p, Layout(dp=16, ep=ep, micro_batch=1, num_gpus=16), compression=DENSE)
        want = (m.num_params() - routed * (1 - 1 / ep)) * 2 / 2**30
        assert pr.memory_terms_gib["weights"] == pytest.approx(want, rel=1e-6), ep
        weights.append(pr.memory_gib)
    assert all(a > b for a, b in zip(weights, weights[1:])) and weights[-1] < weights[0] / 5


def test_expert_compute_is_priced_with_the_imbalance_and_mfu_counts_active_parameters():
    p = _problem(16, batch=64)
    base = price_teacher(p, Layout(dp=16, micro_batch=4, num_gpus=16), compression=DENSE)
    ep = price_teacher(p, Layout(dp=16, ep=8, micro_batch=4, num_gpus=16), compression=DENSE)
    # model FLOPs do not change with the layout (no imbalance, no ep) and count the active experts
    assert ep.model_flops == base.model_flops == forward_flops(p.teacher, b=64, s=p.job.seq_len)
    tokens = 64 * p.job.seq_len
    assert 2 * p.teacher.active_params() * tokens < base.model_flops < 1.5 * 2 * p.teacher.active_params() * tokens
    ov = p.cluster.overheads.model_copy(update={"expert_load_imbalance": 1.0})
    even = replace(p, cluster=p.cluster.model_copy(update={"overheads": ov}))
    flat = price_teacher(even, Layout(dp=16, ep=8, micro_batch=4, num_gpus=16), compression=DENSE)
    # the busiest rank's 1.25x of the routed tokens costs compute and all-to-all bytes
    assert ep.compute_s > flat.compute_s
    assert ep.bytes_per_step["expert_parallel"] == pytest.approx(1.25 * flat.bytes_per_step["expert_parallel"])


def test_plan_of_a_large_moe_teacher_chooses_expert_parallelism_where_it_is_cheaper(tmp_path, kdplan_cli):
    out = tmp_path / "plan.json"
    r = kdplan_cli("plan", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-1.7b", "--cluster", "dgx-h100",
                   "--gpus", "16", "-o", out)
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json(out.read_text())
    t = plan.teacher.layout
    assert t.ep > 1 and "expert parallel ep=" in r.stdout
    # The mechanisms, in the cost model's terms: (1) memory: the same teacher layout without ep
    # holds every expert on each rank (co-located, it no longer fits beside the student), so ep=1
    # must stream its weights from the host or gather them by ZeRO-3 for every micro-batch, or
    # hold them all; (2) compute: a
    # rank's experts run the tokens of all ep ranks, ep x imbalance taller matmuls at the same
    # FLOPs (times the imbalance), which run nearer the GPU's peak; (3) the price: two
    # all-to-alls per block, inside one node (NVLink) where ep * tp <= 8.
    p = _problem(16)
    comp = plan.kd.compression
    chosen = price_teacher(p, t, compression=comp)
    flat = price_teacher(p, t.model_copy(update={"ep": 1}), compression=comp)
    assert flat.memory_terms_gib["weights"] > t.ep / 2 * chosen.memory_terms_gib["weights"]
    if plan.kd.placement == "colocated":  # beside the student, every expert on every rank does not fit
        student_gib = plan.prediction.memory_per_gpu_gib - chosen.memory_gib
        assert flat.memory_gib + student_gib > 80 >= plan.prediction.memory_per_gpu_gib
    gathered = price_teacher(p, t.model_copy(update={"ep": 1, "zero": 3}), compression=comp)
    assert gathered.bytes_per_step["params"] > \
        0.9 * (t.dp - 1) * p.teacher.num_params() * 2 * gathered.num_micro_batches
    imb = p.cluster.overheads.expert_load_imbalance
    tokens = t.micro_batch * p.job.seq_len
    mm_ep = block_matmuls(p.teacher, tokens=tokens, ep=t.ep, imbalance=imb)["mlp"]
    mm_1 = block_matmuls(p.teacher, tokens=tokens)["mlp"]
    assert mm_ep[1].m == pytest.approx(t.ep * imb * mm_1[1].m) and mm_ep[1].count * t.ep == mm_1[1].count
    assert sum(x.flops for x in mm_ep[1:]) == pytest.approx(imb * sum(x.flops for x in mm_1[1:]))
    assert chosen.compute_s < flat.compute_s
    moved = plan.prediction.bytes_per_step
    assert moved["expert_parallel"] > 0 and "offload" not in moved and "params" not in moved
    assert t.tp * t.ep <= 8 and chosen.comm_exposed_s["expert_parallel"] > 0
    # MFU counts active parameters: at all 30.5B it would exceed 100% several times over
    assert 0 < plan.prediction.mfu < 1


def test_deepseek_v3_plans_with_expert_parallelism(tmp_path, kdplan_cli):
    """DeepSeek-V3 (671B) with a small student of its own tokenizer (a 12-block deepseek_v3 config,
    every block dense): on 64 H200 its experts only fit split over ranks or streamed."""
    cfg = dict(model_type="deepseek_v3", hidden_size=2048, intermediate_size=8192, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=16, vocab_size=129280, max_position_embeddings=163840,
               q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=1024, n_shared_experts=1,
               first_k_dense_replace=12, n_group=1, topk_group=1, tie_word_embeddings=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "plan.json"
    r = kdplan_cli("plan", "--teacher", "deepseek-v3", "--student", path, "--cluster", "dgx-h200", "--gpus", "64",
                   "-o", out)
    assert r.returncode == 0, r.stderr
    plan = Plan.model_validate_json(out.read_text())
    t = plan.teacher.layout
    assert t.ep > 1 and 256 % t.ep == 0 and t.dp % t.ep == 0
    assert plan.prediction.bytes_per_step["expert_parallel"] > 0
    # its all-to-alls stay inside a node where the layout allows (tp * ep <= 8 GPUs)
    assert t.tp * t.ep <= 8


def test_sequence_level_kd_refuses_an_ep_pin(kdplan_cli):
    # deepseek-v3 -> qwen3-8b (two tokenizers) is planned as sequence-level KD, whose generation is
    # priced without expert parallelism: the pin is refused by name, not ignored
    r = kdplan_cli("plan", "--teacher", "deepseek-v3", "--student", "qwen3-8b", "--cluster", "dgx-h200",
                   "--gpus", "64", "--fix", "teacher.ep=8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "teacher.ep=8" in r.stderr and "sequence-level" in r.stderr
