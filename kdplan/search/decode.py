"""Decode a chosen candidate into plan pieces: pipeline stages, the global rank map, summaries.

Rank order. Ranks follow the cluster's GPU order (group 0's GPUs first). Co-located roles share
ranks 0..N-1. A disaggregated split of one GPU group gives the teacher the first g_t ranks and
the student the rest; on a mixed cluster each role takes its group's ranks, lower group first.
Inside a role, rank = base + ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank: tp
innermost, so a tensor-parallel group sits inside a node, and a context-parallel ring next to it.
"""

from __future__ import annotations

from ..schema.layers import layer_ranges, split_layers
from ..schema.plan import Layout, Stage


def role_bases(arr, cluster) -> tuple[int, int]:
    """First global rank of the teacher and of the student."""
    if arr.placement != "disaggregated":
        return 0, 0
    if len(cluster.groups) == 1 or arr.teacher_group < arr.student_group:
        return 0, arr.teacher_gpus
    return arr.student_gpus, 0


def gpu_of_rank(cluster, arr, rank: int) -> str:
    """GPU type of a global rank, given which groups the arrangement uses (in rank order)."""
    if arr.placement == "disaggregated":
        groups = sorted({arr.teacher_group, arr.student_group})
        sizes = {arr.teacher_group: arr.teacher_gpus, arr.student_group: arr.student_gpus}
        if len(groups) == 1:
            return cluster.groups[groups[0]].node.gpu
    else:
        groups = list(arr.student_groups)
        sizes = {g: cluster.groups[g].num_nodes * cluster.groups[g].node.gpus_per_node for g in groups}
    for g in groups:
        if rank < sizes[g]:
            return cluster.groups[g].node.gpu
        rank -= sizes[g]
    return cluster.groups[groups[-1]].node.gpu


def finalize_layout(lo: Layout, num_layers: int, base: int, stage_layers, gpu_of) -> Layout:
    """The layout with its stages (layer ranges, ranks, GPU type) and rank list filled in."""
    counts = stage_layers or split_layers(num_layers, lo.pp * lo.virtual_stages)
    stages = []
    per_stage = lo.stage_gpus
    for s, (first, last) in enumerate(layer_ranges(counts)):
        p = s % lo.pp
        ranks = [base + p * per_stage + i for i in range(per_stage)]
        stages.append(Stage(first_layer=first, last_layer=last, ranks=ranks, gpu=gpu_of(ranks[0])))
    return lo.model_copy(update={"stages": stages, "ranks": list(range(base, base + lo.num_gpus))})


def layout_summary(lo: Layout | None) -> str:
    if lo is None:
        return "-"
    s = f"tp={lo.tp} pp={lo.pp} dp={lo.dp} mb={lo.micro_batch}"
    if lo.cp > 1:
        s += f" cp={lo.cp}"
    if lo.ep > 1:
        s += f" ep={lo.ep}"
    if lo.zero:
        s += f" zero={lo.zero}"
    if lo.shard < lo.dp:
        s += f" shard_group={lo.shard}"
    if lo.recompute != "none":
        s += f" recompute={lo.recompute}"
    if lo.sequence_parallel:
        s += " sp"
    if lo.virtual_stages > 1:
        s += f" v={lo.virtual_stages}"
    if lo.offload != "none":
        s += f" offload={lo.offload}"
    if lo.grad_compression != "none":
        s += f" grad={lo.grad_compression}"
    if lo.forward_precision != "bf16":
        s += f" prec={lo.forward_precision}"
    return s


def candidate_summary(arr, comp, teacher: Layout | None, student: Layout, stage_layers=None) -> str:
    parts = [arr.label()]
    if arr.mode != "train":
        parts.append(f"teacher outputs {comp}")
        if teacher is not None and arr.mode == "online":
            parts.append(f"teacher {layout_summary(teacher)}")
    st = f"student {layout_summary(student)}"
    if stage_layers:
        st += f" layers/stage {'/'.join(map(str, stage_layers))}"
    parts.append(st)
    return "; ".join(parts)
