"""executor.hostmem: on a CPU the executor keeps freed host memory in the process, so a step's
fresh tensors do not come back from the kernel as page faults (what the CUDA caching allocator
does for device memory). Counted in page faults (getrusage), never in time."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")

# A step's worth of large temporaries allocated, touched and freed again and again: 64 MiB each,
# above glibc's largest dynamic mmap threshold (32 MiB), so by default every one is a fresh mmap.
PROBE = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from executor.hostmem import retain_host_memory
    print(retain_host_memory(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(12):
    if i == 8:
        f0 = faults()  # after the warm-up rounds (the heap settles in a few)
    x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, every page touched
    y = x * 2.0
    del x, y
print(faults() - f0)
"""


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_retained_host_memory_is_not_faulted_in_again():
    """Four rounds of two 64 MiB tensors are 131,072 pages: by default the kernel hands them out
    fresh every round; with the executor's setting they come back from the process's heap (once
    it has settled: the first rounds grow it, measured 16k faults in round 6, none after)."""
    pages = 4 * 2 * 64 * 2**20 // 4096
    default, retained = _faults("default"), _faults("retain")
    assert default > pages / 2  # the probe does what it says: fresh pages every round by default
    assert retained < pages / 20


def test_retain_host_memory_says_what_it_did():
    from executor.hostmem import retain_host_memory
    msg = retain_host_memory()
    assert msg.startswith("glibc: freed host memory kept") or "allocator defaults kept" in msg


def test_the_defaults_can_be_kept(monkeypatch):
    """KDPLAN_HOST_MEMORY=default: less resident memory for page faults every step (the user's choice)."""
    from executor.hostmem import retain_host_memory
    monkeypatch.setenv("KDPLAN_HOST_MEMORY", "default")
    assert "allocator defaults kept (KDPLAN_HOST_MEMORY=default)" in retain_host_memory()
