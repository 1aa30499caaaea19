"""What a rank measures about itself, true on a GPU as on a CPU: time and peak memory.

Time. CUDA kernels and NCCL collectives run asynchronously: ``perf_counter`` around a step
measures how fast Python queued the work, and ``Work.wait()`` only makes the current stream wait
for NCCL's, it does not block the host. Every span the executor reports (a step, a wait for the
teacher, a teacher's idle time) is therefore timed with the device synchronised at both ends
(``StepTimer``): work queued before the span does not count in it, work queued inside it does.
On CPU the sync is a no-op and the numbers are the wall times they always were.

Memory. On CUDA: the caching allocator's ``max_memory_reserved`` (what the allocator took from
the driver, cache included) plus what the process holds outside the allocator (CUDA context,
cuBLAS workspaces, NCCL buffers), taken from ``mem_get_info`` as device memory in use minus the
allocator's reservation, at the largest of the samples taken (``mem_get_info`` sees the whole
device: another process on the same GPU would be counted too; the executor runs one rank per GPU).
On CPU: the process's peak RSS.
"""

from __future__ import annotations

import resource
import time

import torch

GIB = 2**30


def device_sync(device: torch.device) -> None:
    """Block the host until every kernel and collective queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """``with StepTimer(device) as t: ...`` then ``t.elapsed_s``: seconds of the span's device work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.elapsed_s = 0.0

    def __enter__(self) -> "StepTimer":
        device_sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        device_sync(self.device)
        self.elapsed_s = time.perf_counter() - self._t0


class PeakMemory:
    """Peak memory of this process on its device, in GiB. Call ``sample()`` after start-up (process
    group, NCCL communicators) and wherever else non-allocator memory may have grown; ``peak_gib()``
    at the end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.outside_bytes = 0  # CUDA: device memory in use that the caching allocator did not reserve

    def sample(self) -> None:
        if self.device.type != "cuda":
            return
        free, total = torch.cuda.mem_get_info(self.device)
        self.outside_bytes = max(self.outside_bytes, total - free - torch.cuda.memory_reserved(self.device))

    def peak_gib(self) -> float:
        if self.device.type != "cuda":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        self.sample()
        return (torch.cuda.max_memory_reserved(self.device) + self.outside_bytes) / GIB


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers held by this rank (a DTensor's local shard),
    each tensor once: the weights as stored (bf16, or int8 / fp8 + scales for a quantized teacher)."""
    from torch.distributed.tensor import DTensor

    tensors = list(module.parameters()) + list(module.buffers())
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


class SpanClock:
    """Spans inside a step, timed without blocking the host: CUDA events on a GPU (read with
    ``spans_s`` once the step's end has synchronised the device), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def spans_s(self) -> list[float]:
        """Seconds between consecutive marks; resets the clock."""
        pairs = list(zip(self.marks, self.marks[1:]))
        self.marks = []
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]
