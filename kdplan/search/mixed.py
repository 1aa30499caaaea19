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


def balance_layers(num_layers: int, stage_time_per_layer: list[float]) -> tuple[int, ...]:
    """Contiguous layer counts per stage minimising the slowest stage (each stage >= 1 layer)."""
    p = len(stage_time_per_layer)
    if p > num_layers:
        raise ValueError(f"{p} stages for {num_layers} layers")
    bounds = sorted({l * t for t in stage_time_per_layer for l in range(1, num_layers + 1)})
    lo, hi = 0, len(bounds) - 1
    while lo < hi:  # smallest bound under which the stages hold all layers
        mid = (lo + hi) // 2
        if sum(math.floor(bounds[mid] / t + 1e-9) for t in stage_time_per_layer) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    cap = [max(1, math.floor(bounds[lo] / t + 1e-9)) for t in stage_time_per_layer]
    # Trim the surplus from the slowest stages first so the bottleneck never grows.
    surplus = sum(cap) - num_layers
    for i in sorted(range(p), key=lambda i: -cap[i] * stage_time_per_layer[i]):
        take = min(surplus, cap[i] - 1)
        cap[i] -= take
        surplus -= take
    return tuple(cap)


def even_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if i < extra else 0) for i in range(pp))


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
