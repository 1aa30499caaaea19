"""Measure a storage tier: sequential write and read bandwidth and free capacity of a directory.

The job planner (kdplan.cost.job) prices the offline teacher-output cache with a
:class:`~kdplan.schema.cluster.StorageTier`: its capacity bounds the cache, its write bandwidth the
one teacher pass, its read bandwidth every later epoch. ``kdplan profile`` measures the tier that
holds a directory with this module (pure Python: the planner side never imports torch).

Method (what ``fio --rw=write/read --bs=8M --direct=0 --end_fsync=1`` would do, without fio):
- write: ``size`` bytes in 8 MiB blocks of incompressible data to a new file, then ``fsync``; the
  time includes the fsync, so the page cache does not flatter the number;
- read: the file's pages are dropped from the page cache (``posix_fadvise(DONTNEED)`` on the clean,
  synced file: no root needed), then it is read back sequentially in 8 MiB blocks. Where the kernel
  ignores the advice (some network file systems) the read is a page-cache read and says so: the
  measured rate is then above what the device sustains, and the source string warns;
- capacity: the free bytes of the file system at measurement time (``shutil.disk_usage``), which is
  what a cache written there can use, not the device's size.
The file is removed afterwards, also on error or interrupt.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..schema.cluster import StorageTier

BLOCK = 8 * 2**20  # bytes per write/read call
MIN_BYTES = BLOCK


def measure_storage(directory: str | Path, size_bytes: int, *, name: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> StorageTier:
    """Write then read back ``size_bytes`` under ``directory``; return the tier with a source line
    that says how it was measured. Raises InputError for a missing or unwritable directory or a
    size the free space cannot hold."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"--storage-dir {d}: not a directory")
    if not os.access(d, os.W_OK):
        raise InputError(f"--storage-dir {d}: not writable")
    size = max(MIN_BYTES, (int(size_bytes) // BLOCK) * BLOCK)
    free = shutil.disk_usage(d).free
    if size > 0.9 * free:
        raise InputError(f"--storage-dir {d}: measuring needs {size / 2**20:.0f} MiB but only "
                         f"{free / 2**20:.0f} MiB are free; use --storage-mib with less")
    block = os.urandom(BLOCK)  # incompressible: a compressing file system would flatter zeros
    n = size // BLOCK
    path = d / f".kdplan-storage-{uuid.uuid4().hex}.bin"
    report = progress or (lambda done, total, label: None)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            t0 = clock()
            for i in range(n):
                os.write(fd, block)
                report(i + 1, 2 * n, "storage write")
            os.fsync(fd)
            write_s = clock() - t0
        finally:
            os.close(fd)
        dropped = _drop_cache(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            t0 = clock()
            for i in range(n):
                got += len(os.read(fd, BLOCK))
                report(n + i + 1, 2 * n, "storage read")
            read_s = clock() - t0
        finally:
            os.close(fd)
        if got != size:
            raise InputError(f"--storage-dir {d}: read back {got} of {size} bytes")
    finally:
        path.unlink(missing_ok=True)
    write_gb_s = size / max(write_s, 1e-9) / 1e9
    read_gb_s = size / max(read_s, 1e-9) / 1e9
    how = (f"measured by kdplan profile in {d}: {size / 2**20:.0f} MiB in {BLOCK // 2**20} MiB blocks, "
           f"write timed with fsync ({write_s:.2f} s), read after dropping the file's pages from the "
           f"page cache ({read_s:.2f} s)")
    if not dropped:
        how += ("; the page cache could not be dropped here (no posix_fadvise), so the read rate may be a "
                "page-cache rate, above what the device sustains")
    how += f"; capacity = free space at measurement time ({free / 1e12:.3f} TB)"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    return StorageTier(name=name or f"storage under {d}", capacity_tb=max(free / 1e12, 1e-9),
                       read_gb_per_s=read_gb_s, write_gb_per_s=write_gb_s, source=how,
                       capacity_measured=f"free space of {d} on {when} UTC")


def _drop_cache(path: Path) -> bool:
    """Ask the kernel to drop the (synced, clean) file's pages; True where the call exists."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def with_storage(cluster, tier: StorageTier, *, shared: bool):
    """The cluster file with ``tier`` as its shared file system (``shared``) or as the node-local
    storage of every node group (the profile measures one node; its groups are alike)."""
    if shared:
        return cluster.model_copy(update={"shared_storage": tier})
    groups = [g.model_copy(update={"node": g.node.model_copy(update={"local_storage": tier})}) for g in cluster.groups]
    return cluster.model_copy(update={"groups": groups})
