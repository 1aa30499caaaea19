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
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schema.cluster import Link, NodeSpec


def link_time(link: Link, nbytes: float, *, messages: int = 1, op: str | None = None) -> float:
    """Point-to-point: latency per message + bytes / achieved bandwidth (of collective ``op``:
    "send_recv" for isend/irecv between ranks; None for host copies)."""
    bw = op_bandwidth(link, op) if op else link.bandwidth_gb_per_s * 1e9 * link.efficiency
    return messages * link.latency_us * 1e-6 + nbytes / bw


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


def _collective(node: NodeSpec, size: int, stride: int, ring, hierarchical) -> float:
    """Dispatch on where the group sits: one node, one rank per node, or both (hierarchical)."""
    g = place_group(size, stride, node.gpus_per_node)
    if g.size <= 1:
        return 0.0
    if g.nodes == 1:
        return ring(node.intra_node, g.size)
    if g.per_node == 1:
        return ring(node.inter_node, g.size)
    return hierarchical(g)


def allreduce_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """All-reduce of ``nbytes`` over a group of ``size`` ranks ``stride`` apart on ``node``s;
    hierarchical: reduce-scatter in the node, all-reduce of 1/g across nodes, all-gather."""
    return _collective(node, size, stride, lambda link, k: ring_allreduce_time(link, nbytes, k),
                       lambda g: ring_allgather_time(node.intra_node, nbytes, g.per_node, "reduce_scatter")
                       + ring_allgather_time(node.intra_node, nbytes, g.per_node)
                       + ring_allreduce_time(node.inter_node, nbytes / g.per_node, g.nodes))


def allgather_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1, op: str = "all_gather") -> float:
    """All-gather (``op="reduce_scatter"``: the mirror-image reduce-scatter) of a ``nbytes`` full
    buffer over ``size`` ranks; hierarchical: 1/g of it across nodes, then the whole inside the node."""
    return _collective(node, size, stride, lambda link, k: ring_allgather_time(link, nbytes, k, op),
                       lambda g: ring_allgather_time(node.inter_node, nbytes / g.per_node, g.nodes, op)
                       + ring_allgather_time(node.intra_node, nbytes, g.per_node, op))


def reduce_scatter_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """Reduce-scatter of a ``nbytes`` full buffer: the all-gather's volume at the reduce-scatter's bandwidth."""
    return allgather_time(node, nbytes, size, stride, op="reduce_scatter")


def flat_allgather_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1, op: str = "all_gather") -> float:
    """All-gather (or reduce-scatter) as one flat ring: inside a node on NVLink, else at each GPU's inter-node rate."""
    g = place_group(size, stride, node.gpus_per_node)
    return ring_allgather_time(node.intra_node if g.nodes == 1 else node.inter_node, nbytes, g.size, op)


def p2p_link(node: NodeSpec, stride: int) -> Link:
    """Link between two ranks ``stride`` apart (pipeline neighbours)."""
    return node.intra_node if stride < node.gpus_per_node else node.inter_node


def p2p_time(node: NodeSpec, nbytes: float, stride: int) -> float:
    """Send of ``nbytes`` to a rank ``stride`` away."""
    return link_time(p2p_link(node, stride), nbytes, op="send_recv") if nbytes > 0 else 0.0


def alltoall_time(node: NodeSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """All-to-all over ``size`` ranks ``stride`` apart, each rank holding a ``nbytes`` buffer of
    which 1/k stays and (k-1)/k goes out, 1/k to each peer (NCCL runs it as grouped send/recv, so
    it is priced at the send_recv bandwidth, one message latency per peer). Inside a node:
    (k-1)*alpha + (k-1)/k * S / B_intra. A group spanning nodes with g ranks per node: the
    (k-g)/k bound for other nodes leaves at each GPU's inter-node rate while the (g-1)/k for its
    node-mates crosses NVLink at the same time; the slower of the two."""
    g = place_group(size, stride, node.gpus_per_node)
    k = g.size
    if k <= 1 or nbytes <= 0:
        return 0.0
    if g.nodes == 1:
        return (k - 1) * node.intra_node.latency_us * 1e-6 + (k - 1) / k * nbytes / op_bandwidth(node.intra_node, "send_recv")
    inter = (k - g.per_node) * node.inter_node.latency_us * 1e-6 \
        + (k - g.per_node) / k * nbytes / op_bandwidth(node.inter_node, "send_recv")
    intra = ((g.per_node - 1) * node.intra_node.latency_us * 1e-6
             + (g.per_node - 1) / k * nbytes / op_bandwidth(node.intra_node, "send_recv")) if g.per_node > 1 else 0.0
    return max(inter, intra)
