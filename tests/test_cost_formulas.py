"""Cost-model formulas against hand calculations written out here (formulas.md)."""

import math

import pytest

from kdplan.cost import (activation_bytes_per_layer, allgather_time, allreduce_time, in_flight, layer_flops,
                         matmul_efficiency, megatron_iteration_flops, model_state_bytes, place_group,
                         ring_allreduce_time, split_layers, train_model_flops)
from kdplan.schema.cluster import ComputeEfficiency, Link, NodeSpec
from kdplan.schema.model import ModelSpec

# GPT-3 175B (Brown et al. Table 2.1): h = 12288, a = 96, f = 4h, plain MLP, dropout.
GPT3 = ModelSpec(name="gpt3-175b", family="gpt", num_layers=96, hidden_size=12288, num_heads=96,
                 num_kv_heads=96, ffn_hidden_size=4 * 12288, gated_mlp=False, vocab_size=51200,
                 tied_embeddings=True, max_positions=2048, norm="layernorm", learned_positions=True)


def link(gb_per_s, latency_us=0.0, eff=1.0):
    return Link(name="test", bandwidth_gb_per_s=gb_per_s, latency_us=latency_us, efficiency=eff, source="test")


def node(intra=300.0, inter=25.0, gpus=8):
    return NodeSpec(gpu="a100-80g", gpus_per_node=gpus, intra_node=link(intra), inter_node=link(inter),
                    host=link(25.0), host_memory_gib=1024, source="test")


def test_gpt3_layer_flops_by_hand():
    b, s, h = 1, 2048, 12288
    # 24*b*s*h^2 (QKV 6, output 2, MLP 16) + 4*b*s^2*h (QK^T and AV)
    hand = 24 * b * s * h**2 + 4 * b * s**2 * h
    lf = layer_flops(GPT3, b=b, s=s)
    assert lf.total == pytest.approx(hand, rel=1e-12)
    assert lf.attn_core == pytest.approx(4 * b * s**2 * h)
    assert layer_flops(GPT3, b=b, s=s, tp=8).total == pytest.approx(hand / 8)


def test_gqa_and_gated_mlp_flops():
    m = GPT3.model_copy(update={"num_kv_heads": 8, "gated_mlp": True, "ffn_hidden_size": 32768})
    b, s, h = 2, 1024, 12288
    lf = layer_flops(m, b=b, s=s)
    # Q and O: 4bsh^2; K and V scaled by g/a = 8/96; gated MLP 6bshf
    assert lf.attn_proj == pytest.approx(4 * b * s * h**2 + 4 * b * s * h**2 * 8 / 96)
    assert lf.mlp == pytest.approx(6 * b * s * h * 32768)


def test_training_flops_equal_narayanan_eq3_without_recompute():
    B, s = 1536, 2048
    # 72*B*s*l*h^2*(1 + s/6h + V/(12 l h)): forward + backward of every block and the logits
    assert train_model_flops(GPT3, sequences=B, s=s) == pytest.approx(
        megatron_iteration_flops(batch=B, s=s, layers=96, hidden=12288, vocab=51200, recompute=False), rel=1e-12)
    with_rc = megatron_iteration_flops(batch=B, s=s, layers=96, hidden=12288, vocab=51200)
    hand = 96 * B * s * 96 * 12288**2 * (1 + s / (6 * 12288) + 51200 / (16 * 96 * 12288))
    assert with_rc == pytest.approx(hand, rel=1e-12)


def test_ring_allreduce_time_by_hand():
    # 1 GB over 8 ranks at 100 GB/s: 2*(8-1)/8 * 1e9 / 1e11 = 17.5 ms, plus 2*(8-1) latencies of 5 us
    t = ring_allreduce_time(link(100.0, latency_us=5.0), 1e9, 8)
    assert t == pytest.approx(0.0175 + 14 * 5e-6, rel=1e-12)
    assert ring_allreduce_time(link(100.0), 1e9, 1) == 0.0


def test_collective_tier_follows_rank_placement():
    n = node(intra=300.0, inter=25.0)
    s = 1e9
    # tp-style group of 8 contiguous ranks: one node, NVLink
    assert allreduce_time(n, s, 8, 1) == pytest.approx(2 * 7 / 8 * s / 300e9)
    # dp group with stride 8 (tp = 8 innermost): one rank per node, InfiniBand
    assert allreduce_time(n, s, 4, 8) == pytest.approx(2 * 3 / 4 * s / 25e9)
    # 32 contiguous ranks over 4 nodes: reduce-scatter + all-gather in the node, 1/8 across nodes
    hier = 2 * (7 / 8) * s / 300e9 + 2 * (3 / 4) * (s / 8) / 25e9
    assert allreduce_time(n, s, 32, 1) == pytest.approx(hier)
    assert place_group(32, 1, 8).nodes == 4 and place_group(4, 2, 8).nodes == 1
    # all-gather moves half the all-reduce volume
    assert allgather_time(n, s, 8, 1) == pytest.approx(7 / 8 * s / 300e9)


def test_activation_bytes_korthikanti():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    # no parallelism: sbh(34 + 5as/h)
    assert activation_bytes_per_layer(GPT3, b=b, s=s) == pytest.approx(sbh * (34 + 5 * a * s / h))
    # tensor parallel without sequence parallel: sbh(10 + 24/t + 5as/(ht))
    assert activation_bytes_per_layer(GPT3, b=b, s=s, tp=t) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    # tensor + sequence parallel + selective recompute: 34 sbh / t
    assert activation_bytes_per_layer(GPT3, b=b, s=s, tp=t, sequence_parallel=True,
                                      recompute="selective") == pytest.approx(34 * sbh / t)
    # full recompute keeps the block input: 2 sbh (/t with sequence parallel)
    assert activation_bytes_per_layer(GPT3, b=b, s=s, tp=t, recompute="full") == pytest.approx(2 * sbh)
    assert activation_bytes_per_layer(GPT3, b=b, s=s, tp=t, sequence_parallel=True,
                                      recompute="full") == pytest.approx(2 * sbh / t)


def test_zero_memory_by_hand():
    psi = 1e9
    assert sum(model_state_bytes(psi, dp=8, zero=0).values()) == pytest.approx(16e9)
    assert sum(model_state_bytes(psi, dp=8, zero=1).values()) == pytest.approx(4e9 + 12e9 / 8)
    assert sum(model_state_bytes(psi, dp=8, zero=2).values()) == pytest.approx(2e9 + 14e9 / 8)
    assert sum(model_state_bytes(psi, dp=8, zero=3).values()) == pytest.approx(16e9 / 8)
    assert sum(model_state_bytes(psi, dp=8, zero=0, grad_bytes=4).values()) == pytest.approx(18e9)
    frozen = model_state_bytes(psi, dp=8, zero=0, train=False)
    assert frozen == {"weights": 2e9}


def test_in_flight_micro_batches_per_schedule():
    assert [in_flight("1f1b", stage=i, pp=4, m=8) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight("1f1b", stage=0, pp=4, m=2) == 2
    assert in_flight("gpipe", stage=3, pp=4, m=8) == 8
    # interleaved stage 0: p + (p - 1)/v = p * (1 + (p - 1)/(p v))
    assert in_flight("interleaved_1f1b", stage=0, pp=4, m=16, v=2) == pytest.approx(4 * (1 + 3 / 8))


def test_efficiency_rises_with_size_and_width():
    eff = ComputeEfficiency(max_fraction=0.8, half_saturation_gflop=10, min_dim_saturation=128)
    small, big = matmul_efficiency(eff, 1e9, 4096), matmul_efficiency(eff, 1e12, 4096)
    assert small < big < 0.8
    assert big == pytest.approx(0.8 * 1e12 / (1e12 + 1e10))
    assert matmul_efficiency(eff, 1e12, 32) == pytest.approx(big * 32 / 128)


def test_split_layers_even_and_remainder_in_the_middle():
    assert split_layers(24, 4) == (6, 6, 6, 6)
    assert split_layers(70, 12) == (5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 5)
    assert sum(split_layers(105, 35)) == 105
    assert math.prod(split_layers(3, 1)) == 3
