"""Mixed clusters: pipeline stages on GPU groups of different speed, more layers on faster GPUs.

Stages are laid out in rank order over the groups (group 0's GPUs first), so stage i runs on
group g(i). Given a per-layer time t_g on each group, the layer split minimises the slowest
stage, max_i l_i * t_g(i), over contiguous ranges with sum_i l_i = L and l_i >= 1. The optimum
is found exactly by trying each candidate bottleneck value l * t_g in increasing order and
checking whether the stages can hold L layers under it (a stage under bound T holds
floor(T / t_g(i)) layers): O(L * groups * log) with no solver needed.
"""

from __future__ import annotations

import math


def stage_groups(group_gpus: list[int], gpus_per_stage: int) -> tuple[int, ...] | None:
    """The group of each pipeline stage when every stage takes ``gpus_per_stage`` GPUs and the
    stages fill the groups in order; None when a group does not hold a whole number of stages."""
    out: list[int] = []
    for g, n in enumerate(group_gpus):
        if n % gpus_per_stage:
            return None
        out.extend([g] * (n // gpus_per_stage))
    return tuple(out)


def balance_layers(num_layers: int, stage_time_per_layer: list[float],
                   extra: list[float] | None = None) -> tuple[int, ...]:
    """Contiguous layer counts per stage minimising the slowest stage, max_i l_i * t_i + e_i
    (each stage >= 1 layer). ``extra`` e_i is fixed work on stage i in the same time unit, e.g.
    the output projection and loss on the last stage (several layers' worth at a large vocabulary)."""
    p = len(stage_time_per_layer)
    if p > num_layers:
        raise ValueError(f"{p} stages for {num_layers} layers")
    t = stage_time_per_layer
    e = list(extra) if extra is not None else [0.0] * p

    def holds(bound: float, i: int) -> int:
        return math.floor((bound - e[i]) / t[i] + 1e-9)

    bounds = sorted({l * t[i] + e[i] for i in range(p) for l in range(1, num_layers + 1)})
    lo, hi = 0, len(bounds) - 1
    while lo < hi:  # smallest bound under which the stages hold all layers
        mid = (lo + hi) // 2
        if sum(max(0, holds(bounds[mid], i)) for i in range(p)) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    cap = [max(1, holds(bounds[lo], i)) for i in range(p)]
    # Trim the surplus from the slowest stages first so the bottleneck never grows.
    surplus = sum(cap) - num_layers
    for i in sorted(range(p), key=lambda i: -(cap[i] * t[i] + e[i])):
        take = min(surplus, cap[i] - 1)
        cap[i] -= take
        surplus -= take
    return tuple(cap)


def output_projection_layers(model, seq_len: int) -> float:
    """The output (vocabulary) projection's forward FLOPs in transformer layers' worth: the fixed
    work the last pipeline stage carries on top of its layers (V / (12 h) or so: 3.4 for
    llama-3.2-1b at V = 128k)."""
    from ..cost.flops import layer_flops, logits_flops
    return logits_flops(model, b=1, s=seq_len) / layer_flops(model, b=1, s=seq_len).total


def balance_layers_with_head(num_layers: int, stage_time_per_layer: list[float], model, seq_len: int) -> tuple[int, ...]:
    """``balance_layers`` with the output projection counted on the last stage."""
    t = stage_time_per_layer
    head = output_projection_layers(model, seq_len) * t[-1]
    return balance_layers(num_layers, t, extra=[0.0] * (len(t) - 1) + [head])


def relative_layer_time(cluster, precision: str) -> list[float]:
    """Per-layer time of each group relative to the fastest: 1 / (dense peak x achievable fraction).

    A first-order estimate to place the layer boundaries; the cost model then prices the split.
    """
    speeds = []
    for i in range(len(cluster.groups)):
        gpu = cluster.gpu_of_group(i)
        peak = getattr(gpu.peak, f"{precision}_tflops")
        speeds.append(peak * gpu.efficiency.max_fraction)
    fastest = max(speeds)
    return [fastest / s for s in speeds]


MAX_TEACHER_NODE_COUNTS = 16  # teacher sizes tried per group of a mixed cluster (geometric beyond)


def teacher_gpu_counts(cluster, group: int) -> list[int]:
    """GPU counts the teacher may take on ``group`` of a mixed cluster when it runs apart from the
    student (which takes its whole group): the whole group, or fewer of its whole nodes. The
    forward-only teacher's layouts exist only on some GPU counts (tp divides its heads, pp its
    layers, dp the global batch: GPT-13B has none on 24 GPUs, but one on 16), so leaving nodes of
    its group idle can be the only way, or the fastest way, to use that group for the teacher."""
    g = cluster.groups[group]
    gpn, nodes = g.node.gpus_per_node, g.num_nodes
    counts = list(range(1, nodes + 1))
    if nodes > MAX_TEACHER_NODE_COUNTS:
        ratio = nodes ** (1 / (MAX_TEACHER_NODE_COUNTS - 1))
        grid, x = {nodes}, 1.0
        while x < nodes:
            grid.add(int(round(x)))
            x *= ratio
        counts = sorted(grid)
    return [c * gpn for c in counts]
