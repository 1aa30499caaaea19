"""Collectives priced with the alpha-beta model on the link tier the group's ranks sit on
(formulas.md section 3).

Ring volumes over k ranks with S the full buffer in bytes: all-reduce moves 2(k-1)/k * S per
rank, all-gather and reduce-scatter (k-1)/k * S, point-to-point S. A link's achieved bandwidth
is ``bandwidth_gb_per_s * efficiency`` (bus bandwidth, as nccl-tests report it), times the
collective's ``op_bandwidth_factor`` where the library does not run it as a ring (gloo's
reduce-scatter on CPU).

Where ranks sit: roles lay ranks out (pp, dp, tp) with tp innermost, so a group is ``size`` ranks
``stride`` apart. A group inside one node uses the intra-node link; a group with one rank per
node uses the inter-node link (each GPU has its own NIC share); a group with several ranks in
each of several nodes is hierarchical: reduce-scatter inside the node, all-reduce of 1/g of the
buffer across nodes, all-gather inside the node.

Latency across nodes follows NCCL's algorithms (Hu et al. 2025, "Demystifying NCCL"): an
all-reduce across nodes runs as a double binary tree, 2 * ceil(log2 n) latency steps over n
nodes, where a ring would take 2(n - 1); reduce-scatter and all-gather have only the ring, one
ring through all k ranks of the group, k - 1 steps each as slow as the ring's inter-node hop (a
ring enters each node once, so the bytes per NIC are the hierarchical ones above, but the steps
are the flat ring's). At hundreds of nodes these steps, times the runtime's number of bucketed
calls (Overheads.grad_bucket_mib, ``bucketed``), are what grows with the GPU count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..schema.cluster import Link, NodeSpec
from .topology import effective_inter_node, ring_share, shift_share


def link_time(link: Link, nbytes: float, *, messages: int = 1, op: str | None = None) -> float:
    """Point-to-point: latency per message + bytes / achieved bandwidth (of collective ``op``:
    "send_recv" for isend/irecv between ranks; None for host copies)."""
    bw = op_bandwidth(link, op) if op else link.bandwidth_gb_per_s * 1e9 * link.efficiency
    return messages * link.latency_us * 1e-6 + nbytes / bw


def host_link(node: NodeSpec, streaming: int) -> Link:
    """The host link one of ``streaming`` devices of ``node`` gets while they all copy to or from
    host memory at once (an offloaded teacher's weights, an offloaded optimizer step: every rank
    of the stage in lockstep): devices behind one host uplink split it
    (NodeSpec.gpus_per_host_link), so each gets bandwidth / min(gpus_per_host_link, streaming)."""
    share = max(1, min(node.gpus_per_host_link, streaming, node.gpus_per_node))
    if share == 1:
        return node.host
    return node.host.model_copy(update={"bandwidth_gb_per_s": node.host.bandwidth_gb_per_s / share})


def op_bandwidth(link: Link, op: str) -> float:
    """Achieved bytes/s of collective ``op`` on ``link``."""
    return link.bandwidth_gb_per_s * 1e9 * link.efficiency * link.op_bandwidth_factor.get(op, 1.0)


def ring_allreduce_time(link: Link, nbytes: float, k: int) -> float:
    """Ring all-reduce of ``nbytes`` over ``k`` ranks: 2(k-1)*alpha + 2(k-1)/k * S / B."""
    if k <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (k - 1) * link.latency_us * 1e-6 + 2.0 * (k - 1) / k * nbytes / op_bandwidth(link, "all_reduce")


def ring_allgather_time(link: Link, nbytes: float, k: int, op: str = "all_gather") -> float:
    """Ring all-gather (``op="reduce_scatter"``: reduce-scatter) of a ``nbytes`` full buffer over
    ``k`` ranks: (k-1)*alpha + (k-1)/k * S / B."""
    if k <= 1 or nbytes <= 0:
        return 0.0
    return (k - 1) * link.latency_us * 1e-6 + (k - 1) / k * nbytes / op_bandwidth(link, op)


@dataclass(frozen=True)
class GroupPlacement:
    """How ``size`` ranks spread over nodes: ``per_node`` ranks in each of ``nodes`` nodes."""

    size: int
    per_node: int
    nodes: int


def place_group(size: int, stride: int, gpus_per_node: int) -> GroupPlacement:
    """Ranks r, r+stride, ..., r+(size-1)*stride on nodes of ``gpus_per_node`` GPUs (role ranks
    start on a node boundary)."""
    if size <= 1:
        return GroupPlacement(1, 1, 1)
    if stride >= gpus_per_node:
        return GroupPlacement(size, 1, size)
    per_node = max(1, min(size, gpus_per_node // stride))
    return GroupPlacement(size, per_node, -(-size // per_node))


def across_nodes(node: NodeSpec, nodes: int) -> NodeSpec:
    """``node`` with its inter-node link at what a ring through ``nodes`` nodes gets on the
    fabric (topology.ring_share: rails, leaves, oversubscription); ``node`` itself without a fabric."""
    if node.fabric is None or nodes <= 1:
        return node
    link = effective_inter_node(node, ring_share(node, nodes))
    return node if link is node.inter_node else node.model_copy(update={"inter_node": link})


def _collective(node: NodeSpec, size: int, stride: int, ring, hierarchical) -> float:
    """Dispatch on where the group sits: one node, one rank per node, or both (hierarchical)."""
    g = place_group(size, stride, node.gpus_per_node)
    if g.size <= 1:
        return 0.0
    if g.nodes == 1:
        return ring(node.intra_node, g.size, False)
    node = across_nodes(node, g.nodes)
    if g.per_node == 1:
        return ring(node.inter_node, g.size, True)
    return hierarchical(node, g)


def tree_allreduce_time(link: Link, nbytes: float, k: int) -> float:
    """All-reduce of ``nbytes`` over ``k`` ranks one per node, as NCCL runs it across nodes: the
    ring's bytes, the latency steps of a double binary tree (2 ceil(log2 k)) where fewer than the
    ring's 2(k - 1)."""
    if k <= 1 or nbytes <= 0:
        return 0.0
    steps = min(2 * (k - 1), 2 * math.ceil(math.log2(k)))
    return steps * link.latency_us * 1e-6 + 2.0 * (k - 1) / k * nbytes / op_bandwidth(link, "all_reduce")


def allreduce_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """All-reduce of ``nbytes`` over a group of ``size`` ranks ``stride`` apart on ``node``s;
    hierarchical: reduce-scatter in the node, all-reduce of 1/g across nodes (a tree's latency),
    all-gather."""
    return _collective(node, size, stride,
                       lambda link, k, inter: (tree_allreduce_time if inter else ring_allreduce_time)(link, nbytes, k),
                       lambda nd, g: ring_allgather_time(nd.intra_node, nbytes, g.per_node, "reduce_scatter")
                       + ring_allgather_time(nd.intra_node, nbytes, g.per_node)
                       + tree_allreduce_time(nd.inter_node, nbytes / g.per_node, g.nodes))


def allgather_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1, op: str = "all_gather") -> float:
    """All-gather (``op="reduce_scatter"``: the mirror-image reduce-scatter) of a ``nbytes`` full
    buffer over ``size`` ranks; across nodes: 1/g of it through each NIC, the whole inside the
    node, and the latency of one ring through all ``size`` ranks at the inter-node hop's latency."""
    def ring_through_nodes(nd: NodeSpec, g: GroupPlacement) -> float:
        inter, intra = nd.inter_node, nd.intra_node
        bw = ((g.nodes - 1) / g.nodes * nbytes / g.per_node / op_bandwidth(inter, op)
              + (g.per_node - 1) / g.per_node * nbytes / op_bandwidth(intra, op))
        return (g.size - 1) * max(inter.latency_us, intra.latency_us) * 1e-6 + bw

    return _collective(node, size, stride, lambda link, k, inter: ring_allgather_time(link, nbytes, k, op),
                       ring_through_nodes)


def broadcast_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """Broadcast of ``nbytes`` from one rank to a group of ``size`` ranks ``stride`` apart, as
    NCCL runs it: a pipelined ring through the group. Latency: the first chunk's trip along the
    chain, each hop at its own link's latency ((k - nodes) NVLink hops, nodes - 1 network hops;
    unlike allgather_time's steps, where every rank sends at once and each step waits for the
    slowest hop). Bytes: every link of the ring carries the whole buffer once, inside a node at the
    NVLink rate, into each node at the node's NICs together (the ring's channels spread over the
    rails: ``per_node`` GPUs' shares of the inter-node rate); the slower of the two sets the pace."""
    g = place_group(size, stride, node.gpus_per_node)
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    intra = nbytes / op_bandwidth(node.intra_node, "all_gather")
    if g.nodes == 1:
        return (g.size - 1) * node.intra_node.latency_us * 1e-6 + intra
    nd = across_nodes(node, g.nodes)
    inter = nbytes / (g.per_node * op_bandwidth(nd.inter_node, "all_gather"))
    hops = ((g.size - g.nodes) * nd.intra_node.latency_us + (g.nodes - 1) * nd.inter_node.latency_us) * 1e-6
    return hops + max(inter, intra if g.per_node > 1 else 0.0)


def bucketed(collective, nbytes: float, bucket_bytes: float | None) -> float:
    """``collective(bytes)`` run as ceil(nbytes / bucket_bytes) equal calls (a runtime's buckets),
    each paying its latency; one call when ``bucket_bytes`` is None."""
    if nbytes <= 0:
        return 0.0
    calls = 1 if not bucket_bytes else max(1, math.ceil(nbytes / bucket_bytes))
    return calls * collective(nbytes / calls)


def reduce_scatter_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """Reduce-scatter of a ``nbytes`` full buffer: the all-gather's volume at the reduce-scatter's bandwidth."""
    return allgather_time(node, nbytes, size, stride, op="reduce_scatter")


def flat_allgather_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1, op: str = "all_gather") -> float:
    """All-gather (or reduce-scatter) as one flat ring: inside a node on NVLink, else at each GPU's inter-node rate."""
    g = place_group(size, stride, node.gpus_per_node)
    return ring_allgather_time(node.intra_node if g.nodes == 1 else across_nodes(node, g.nodes).inter_node,
                               nbytes, g.size, op)


def p2p_link(node: NodeSpec, stride: int, nodes: int = 0) -> Link:
    """Link between two ranks ``stride`` apart (pipeline neighbours); across nodes, at what every
    node sending ``stride`` GPUs further at once gets on the fabric of ``nodes`` nodes
    (topology.shift_share; ``nodes`` 0: the link as it is)."""
    if stride < node.gpus_per_node:
        return node.intra_node
    if node.fabric is None or not nodes:
        return node.inter_node
    return effective_inter_node(node, shift_share(node, nodes, stride // node.gpus_per_node))


def p2p_time(node: NodeSpec, nbytes: float, stride: int, nodes: int = 0) -> float:
    """Send of ``nbytes`` to a rank ``stride`` away (``nodes``: the nodes all sending at once)."""
    return link_time(p2p_link(node, stride, nodes), nbytes, op="send_recv") if nbytes > 0 else 0.0


def ring_exchange_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """One step of a ring exchange (ring attention): every one of ``size`` ranks ``stride`` apart
    sends ``nbytes`` to the next and receives as much from the previous, all at once. Inside a
    node: one send at the NVLink rate; a ring through several nodes steps at its slowest hop, the
    one into the next node, at what a ring through them gets on the fabric (topology.ring_share)."""
    g = place_group(size, stride, node.gpus_per_node)
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    link = node.intra_node if g.nodes == 1 else across_nodes(node, g.nodes).inter_node
    return link_time(link, nbytes, op="send_recv")


def alltoall_inter_node(node: NodeSpec, nodes: int) -> Link:
    """The inter-node link an all-to-all through ``nodes`` nodes gets: every node exchanges with
    every other at once, so the slowest of the shift patterns (topology.shift_share at distances
    1..nodes-1: leaves' uplinks bind first for the far ones); the link as it is without a fabric."""
    if node.fabric is None or nodes <= 1:
        return node.inter_node
    worst = min((shift_share(node, nodes, d) for d in range(1, nodes)), key=lambda x: x.gpu_bandwidth_gb_per_s)
    return effective_inter_node(node, worst)


def alltoall_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """All-to-all over ``size`` ranks ``stride`` apart, each rank holding a ``nbytes`` buffer of
    which 1/k stays and (k-1)/k goes out, 1/k to each peer (NCCL runs it as grouped send/recv, so
    it is priced at the send_recv bandwidth, one message latency per peer). Inside a node:
    (k-1)*alpha + (k-1)/k * S / B_intra. A group spanning nodes with g ranks per node: the
    (k-g)/k bound for other nodes leaves at each GPU's inter-node rate (alltoall_inter_node) while
    the (g-1)/k for its node-mates crosses NVLink at the same time; the slower of the two."""
    g = place_group(size, stride, node.gpus_per_node)
    k = g.size
    if k <= 1 or nbytes <= 0:
        return 0.0
    if g.nodes == 1:
        return (k - 1) * node.intra_node.latency_us * 1e-6 + (k - 1) / k * nbytes / op_bandwidth(node.intra_node, "send_recv")
    link = alltoall_inter_node(node, g.nodes)
    inter = (k - g.per_node) * link.latency_us * 1e-6 + (k - g.per_node) / k * nbytes / op_bandwidth(link, "send_recv")
    intra = ((g.per_node - 1) * node.intra_node.latency_us * 1e-6
             + (g.per_node - 1) / k * nbytes / op_bandwidth(node.intra_node, "send_recv")) if g.per_node > 1 else 0.0
    return max(inter, intra)
