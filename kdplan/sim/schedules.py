"""Pipeline schedules as the order of operations on each pipeline rank.

An operation is ``(kind, micro_batch, chunk)`` with kind "F" (forward) or "B" (backward); chunk
is the model chunk on that rank (always 0 unless interleaved). Virtual stage of chunk c on rank r
is ``c * p + r`` (Megatron's interleaved placement: rank 0 holds stages 0, p, 2p, ...).

- GPipe (torch.distributed.pipelining.ScheduleGPipe): every forward, then every backward, both
  in micro-batch order.
- 1F1B (PipeDream-flush, Megatron ``forward_backward_pipelining_without_interleaving``): rank r
  runs ``min(p - r - 1, m)`` warm-up forwards, then alternates one forward / one backward, then
  drains the remaining backwards. Stage 0 therefore holds at most p micro-batches.
- Interleaved 1F1B (Megatron ``forward_backward_pipelining_with_interleaving``): micro-batches go
  in groups of p through every chunk in turn (``get_schedule_table``); warm-up is
  ``2 (p - r - 1) + (v - 1) p`` virtual micro-batches (all of them when m == p); backwards walk
  the same table with the chunk order reversed. m must be a multiple of p.
"""

from __future__ import annotations

Op = tuple[str, int, int]


def gpipe(m: int) -> list[Op]:
    return [("F", j, 0) for j in range(m)] + [("B", j, 0) for j in range(m)]


def one_f_one_b(m: int, p: int, r: int) -> list[Op]:
    warm = min(p - r - 1, m)
    ops: list[Op] = [("F", j, 0) for j in range(warm)]
    for i in range(m - warm):
        ops += [("F", warm + i, 0), ("B", i, 0)]
    ops += [("B", j, 0) for j in range(m - warm, m)]
    return ops


def schedule_table(m: int, v: int, group: int) -> list[tuple[int, int]]:
    """Megatron-core ``get_schedule_table``: (micro_batch, chunk) per virtual micro-batch."""
    table = []
    for lo in range(0, m, group):
        hi = m if lo + group >= m else lo + group
        table += [(j, c) for c in range(v) for j in range(lo, hi)]
    return table


def interleaved(m: int, p: int, v: int, r: int) -> list[Op]:
    table = schedule_table(m, v, p)
    total = m * v
    warm = total if m == p else min(2 * (p - r - 1) + (v - 1) * p, total)
    fwd = [("F", j, c) for j, c in table]
    bwd = [("B", j, v - 1 - c) for j, c in table]
    ops = fwd[:warm]
    for i in range(total - warm):
        ops += [fwd[warm + i], bwd[i]]
    return ops + bwd[total - warm:]


def rank_ops(schedule: str, m: int, p: int, v: int, r: int) -> list[Op]:
    """Order of operations on pipeline rank ``r`` of ``p`` for ``m`` micro-batches."""
    if m < 1 or p < 1 or v < 1 or not 0 <= r < p:
        raise ValueError(f"bad pipeline shape m={m} p={p} v={v} rank={r}")
    if schedule == "gpipe":
        if v != 1:
            raise ValueError("GPipe has no virtual stages (virtual_stages must be 1)")
        return gpipe(m)
    if schedule == "1f1b" and v == 1 or schedule == "interleaved_1f1b" and v == 1:
        return one_f_one_b(m, p, r)
    if schedule in ("1f1b", "interleaved_1f1b"):
        if m % p:  # as Megatron (and kdplan's cost model) require; other counts can deadlock
            raise ValueError(f"interleaved 1F1B needs micro-batches ({m}) divisible by pp = {p}")
        return interleaved(m, p, v, r)
    raise ValueError(f"unknown pipeline schedule {schedule!r} (gpipe, 1f1b, interleaved_1f1b)")
