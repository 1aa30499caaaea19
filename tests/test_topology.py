"""The network as a graph (kdplan/cost/topology.py) and the collective latency terms of comm.py
(issue 13 item 3). Planner-only: no torch."""

import math

import pytest

from kdplan.cost import comm
from kdplan.cost.topology import fabric_graph, flow_share, ring_share, shift_share
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import Fabric


@pytest.fixture(scope="module")
def node():
    return load_cluster("dgx-a100-80g", 8).groups[0].node


def with_fabric(node, **kw):
    return node.model_copy(update={"fabric": Fabric(**kw)})


def test_no_fabric_and_a_nic_per_gpu_on_one_switch_keep_every_number(node):
    flat = with_fabric(node, nics_per_node=node.gpus_per_node)
    for size, stride in ((64, 1), (16, 4), (32, 8)):
        assert comm.allreduce_time(flat, 1e9, size, stride) == comm.allreduce_time(node, 1e9, size, stride)
        assert comm.allgather_time(flat, 1e9, size, stride) == comm.allgather_time(node, 1e9, size, stride)
    assert comm.p2p_time(flat, 1e8, 64, nodes=32) == comm.p2p_time(node, 1e8, 64)


def test_four_rails_for_eight_gpus_halve_nothing_when_the_link_is_the_per_gpu_share(node):
    # inter_node is the per-GPU share; 4 NICs at twice the rate carry the same node total
    four = with_fabric(node, nics_per_node=4)
    assert ring_share(four, 16).gpu_bandwidth_gb_per_s == pytest.approx(node.inter_node.bandwidth_gb_per_s)


def test_oversubscription_binds_shifts_across_leaves_not_rings(node):
    f = dict(nics_per_node=8, nodes_per_leaf=4, oversubscription=4.0)
    tree = with_fabric(node, **f)
    bw = node.inter_node.bandwidth_gb_per_s
    # a ring leaves a leaf once: one node's NICs through an uplink of 4 nodes / 4
    assert ring_share(tree, 16).gpu_bandwidth_gb_per_s == pytest.approx(bw)
    # every node sending 4 nodes further: whole leaves through the uplinks, a quarter each
    assert shift_share(tree, 16, 4).gpu_bandwidth_gb_per_s == pytest.approx(bw / 4)
    # one node further: only the last node of each leaf crosses the spine, within its uplink
    assert shift_share(tree, 16, 1).gpu_bandwidth_gb_per_s == pytest.approx(bw)
    assert comm.p2p_time(tree, 1e9, 32, nodes=16) > comm.p2p_time(node, 1e9, 32)


def test_flow_share_by_hand():
    f = Fabric(nics_per_node=1, nodes_per_leaf=2, oversubscription=2.0)
    g = fabric_graph(f, 10.0, 4)
    assert g.edges[("leaf", 0, 0), "spine"]["capacity"] == 10.0  # 2 nodes x 10 / 2
    # two flows leaving leaf 0 share its uplink: 5 each; a path through the spine crosses 3 switches
    share, switches = flow_share(f, 10.0, 4, ((0, 2, 0), (1, 3, 0)))
    assert share == 5.0 and switches == 3
    share, switches = flow_share(f, 10.0, 4, ((0, 1, 0),))
    assert share == 10.0 and switches == 1


def test_switch_latency_lengthens_a_hop_across_the_spine(node):
    tree = with_fabric(node, nics_per_node=8, nodes_per_leaf=2, switch_latency_us=1.0)
    assert ring_share(tree, 8).latency_us == pytest.approx(node.inter_node.latency_us + 2.0)
    assert ring_share(tree, 2).latency_us == pytest.approx(node.inter_node.latency_us)


def test_ring_latency_grows_with_ranks_tree_latency_with_their_log(node):
    link = node.inter_node
    small = 1.0  # bytes: latency only
    assert comm.tree_allreduce_time(link, small, 128) == pytest.approx(
        2 * math.ceil(math.log2(128)) * link.latency_us * 1e-6, rel=1e-6)
    assert comm.ring_allreduce_time(link, small, 128) == pytest.approx(2 * 127 * link.latency_us * 1e-6, rel=1e-6)
    # all-gather across nodes: one ring through every rank, each step at the inter-node hop
    t = comm.allgather_time(node, small, 1024, 1)
    assert t == pytest.approx(1023 * link.latency_us * 1e-6, rel=1e-3)


def test_bucketed_calls_each_pay_latency(node):
    one = comm.allgather_time(node, 8e9, 256, 1)
    many = comm.bucketed(lambda x: comm.allgather_time(node, x, 256, 1), 8e9, 512 * 2**20)
    calls = math.ceil(8e9 / (512 * 2**20))
    assert many - one == pytest.approx((calls - 1) * 255 * node.inter_node.latency_us * 1e-6, rel=1e-6)
    assert comm.bucketed(lambda x: comm.allgather_time(node, x, 256, 1), 8e9, None) == one
