"""Host memory kept by the process, as a device's caching allocator keeps device memory.

On a CPU run every tensor is host memory from glibc's malloc. By default glibc hands large blocks
back to the kernel when they are freed (an ``munmap`` of each block above its mmap threshold, a
trim of the heap's top above 128 KiB), so the next step's tensors of the same size come back as
fresh pages: one page fault and one zeroing by the kernel per 4 KiB touched. A training step
frees and reallocates its [tokens x V] logits, the loss's temporaries and the blocks' activations
every micro-batch: on the tiny CPU example that was ~93,000 faults (~380 MB of fresh pages) per
step and 18% of the step's CPU time (measured 2026-12-04, one process replaying the executor's
step order, load 7: 574 ms -> 470 ms per step, 93k -> 0 faults; /usr/bin/time's minor faults say
the same). No cost model term prices page faults; the CUDA caching allocator never returns memory
between steps, and neither does the executor's host now: ``retain_host_memory`` sets glibc's
``M_MMAP_MAX`` to 0 (every block from the heap, none mmapped alone) and ``M_TRIM_THRESHOLD`` to
the largest value (the heap's top is never given back). The process's peak RSS is what the
executor reports as CPU memory (executor.measure.PeakMemory): kept memory is counted there, as a
GPU's reserved memory is, and the heap can hold more than the live tensors (a probe freeing and
reallocating two 64 MiB tensors settles at 0.8 GiB of RSS against 0.35 GiB by default, after six
rounds). Measured on the tiny example (2026-12-04, loaded machine, benchmarks/step_phases.py): the
plan with micro-batch 2 peaks at 0.58 GiB either way; dp2 micro-batch 8 peaks at 1.17-1.28 GiB
against 0.80 GiB with the default, and its loss over the vocabulary takes 250 ms of CPU per step
against 660 ms when blocks of 32 MiB and more stay mmapped (glibc's largest mmap threshold: the
[1024 x 8192] fp32 logits are 32 MiB, faulted in again every micro-batch). Time over memory, as
a GPU's caching allocator chooses.

Called by the executor (executor.launch) and by the micro-benchmarks that `kdplan profile` runs
(executor.bench.run) on a CPU device, so the profile measures the regime the runs execute in. On a
GPU run the host allocations are small and this is not called. Another libc (no ``mallopt``): a
no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest, ~2 GiB of free heap top kept


def retain_host_memory() -> str:
    """Keep freed host memory in the process (see the module docstring). Returns what was done,
    for a log line: "glibc: ..." or why nothing was. ``KDPLAN_HOST_MEMORY=default`` in the
    environment keeps the allocator's defaults (less resident memory, page faults every step)."""
    if os.environ.get("KDPLAN_HOST_MEMORY") == "default":
        return "host memory: allocator defaults kept (KDPLAN_HOST_MEMORY=default)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"host memory: no mallopt in {name or 'the C library'} (not glibc): allocator defaults kept"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1
    return ("glibc: freed host memory kept in the process (M_MMAP_MAX 0, M_TRIM_THRESHOLD max)" if ok
            else "glibc: mallopt refused the settings: allocator defaults kept")


__all__ = ["retain_host_memory"]
