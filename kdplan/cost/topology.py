"""The network between nodes as a graph (issue 13 item 3): what one GPU's inter-node traffic
really gets when many GPUs send at once.

Vertices: each node's NICs (one per rail), one leaf switch per rail and group of
``Fabric.nodes_per_leaf`` nodes (rail-optimised, as DGX SuperPOD builds them), one spine. Edges
carry a capacity in bytes/s: a NIC's rate up to its leaf, a leaf's uplink of
nodes_per_leaf x NIC rate / oversubscription up to the spine. A traffic pattern is a set of
flows (source node, destination node, rail), each routed on its path (same leaf: NIC, leaf, NIC;
across leaves: NIC, leaf, spine, leaf, NIC); every flow gets the smallest capacity / flows
share along its path (max-min fairness's bottleneck, which is what bulk NCCL traffic reaches).

Patterns priced here:
- a ring collective across n nodes (``ring_share``): every node sends to the next on every
  rail; a ring crosses each leaf boundary once, so oversubscription binds only when a leaf's
  uplink is narrower than one node's NICs;
- pipeline sends between stages d nodes apart (``shift_share``): every node sends to the node d
  further at once; when d crosses leaves, whole leaves' traffic meets the uplinks.

Without a ``Fabric`` (or one with a NIC per GPU on one switch) a flow gets its NIC's full rate and
the hop's latency is the link's: the formulas of comm.py are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..schema.cluster import Fabric, NodeSpec


@dataclass(frozen=True)
class Share:
    """What one GPU's inter-node traffic gets in a pattern: bytes/s (datasheet rate, before the
    link's efficiency) and the latency of its path in microseconds."""

    gpu_bandwidth_gb_per_s: float
    latency_us: float


def _leaf(fabric: Fabric, node: int) -> int:
    return node // fabric.nodes_per_leaf if fabric.nodes_per_leaf else 0


def fabric_graph(fabric: Fabric, nic_gb_per_s: float, num_nodes: int):
    """The networkx graph of ``num_nodes`` nodes on ``fabric`` (module docstring), capacities in
    GB/s on each edge's ``capacity``."""
    import networkx as nx

    g = nx.Graph()
    leaves = _leaf(fabric, num_nodes - 1) + 1
    per_leaf = fabric.nodes_per_leaf or num_nodes
    for r in range(fabric.nics_per_node):
        for leaf in range(leaves):
            if leaves > 1:
                g.add_edge(("leaf", leaf, r), "spine",
                           capacity=per_leaf * nic_gb_per_s / fabric.oversubscription)
        for n in range(num_nodes):
            g.add_edge(("nic", n, r), ("leaf", _leaf(fabric, n), r), capacity=nic_gb_per_s)
    return g


def _path(fabric: Fabric, src: int, dst: int, rail: int) -> list:
    a, b = _leaf(fabric, src), _leaf(fabric, dst)
    if a == b:
        return [("nic", src, rail), ("leaf", a, rail), ("nic", dst, rail)]
    return [("nic", src, rail), ("leaf", a, rail), "spine", ("leaf", b, rail), ("nic", dst, rail)]


def flow_share(fabric: Fabric, nic_gb_per_s: float, num_nodes: int,
               flows: tuple[tuple[int, int, int], ...]) -> tuple[float, int]:
    """(GB/s, switch traversals) of the most constrained flow among ``flows`` (src, dst, rail):
    each edge's capacity shared by the flows routed over it (one direction per edge)."""
    g = fabric_graph(fabric, nic_gb_per_s, num_nodes)
    load: dict[tuple, int] = {}
    paths = []
    for src, dst, rail in flows:
        p = _path(fabric, src, dst, rail)
        paths.append(p)
        for e in zip(p, p[1:]):
            load[e] = load.get(e, 0) + 1
    share, switches = float("inf"), 1
    for p in paths:
        for e in zip(p, p[1:]):
            share = min(share, g.edges[e]["capacity"] / load[e])
        switches = max(switches, len(p) - 2)
    return share, switches


def _key(node: NodeSpec) -> tuple:
    f, link = node.fabric, node.inter_node
    return (f.nics_per_node, f.nodes_per_leaf, f.oversubscription, f.switch_latency_us,
            link.bandwidth_gb_per_s, link.latency_us, node.gpus_per_node)


@lru_cache(maxsize=4096)
def _pattern(key: tuple, nodes: int, distance: int) -> Share:
    """distance 0: a ring through the nodes; else every node sends to the one ``distance`` further."""
    rails, per_leaf, oversub, switch_us, gpu_gb_per_s, latency_us, gpus = key
    f = Fabric(nics_per_node=rails, nodes_per_leaf=per_leaf, oversubscription=oversub,
               switch_latency_us=switch_us)
    if distance == 0:
        flows = tuple((i, (i + 1) % nodes, r) for i in range(nodes) for r in range(rails))
    else:
        flows = tuple((i, i + distance, r) for i in range(nodes - distance) for r in range(rails))
    share, switches = flow_share(f, gpu_gb_per_s * gpus / rails, nodes, flows)
    return Share(share * rails / gpus, latency_us + (switches - 1) * switch_us)


def ring_share(node: NodeSpec, nodes: int) -> Share:
    """Per-GPU rate and hop latency of a ring collective through ``nodes`` nodes."""
    if node.fabric is None or nodes <= 1:
        return Share(node.inter_node.bandwidth_gb_per_s, node.inter_node.latency_us)
    return _pattern(_key(node), nodes, 0)


def shift_share(node: NodeSpec, nodes: int, distance: int) -> Share:
    """Per-GPU rate and latency of sends from every node to the node ``distance`` further, all
    at once (pipeline stages ``distance`` nodes apart on ``nodes`` nodes)."""
    if node.fabric is None or nodes <= distance or distance < 1:
        return Share(node.inter_node.bandwidth_gb_per_s, node.inter_node.latency_us)
    return _pattern(_key(node), nodes, distance)


def effective_inter_node(node: NodeSpec, share: Share):
    """``node.inter_node`` at the rate and latency a traffic pattern leaves it (the same Link
    object when nothing changes, so memoised prices stay shared)."""
    link = node.inter_node
    if share.gpu_bandwidth_gb_per_s == link.bandwidth_gb_per_s and share.latency_us == link.latency_us:
        return link
    return link.model_copy(update={"bandwidth_gb_per_s": share.gpu_bandwidth_gb_per_s,
                                   "latency_us": share.latency_us})
