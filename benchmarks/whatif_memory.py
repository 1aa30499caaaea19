"""Load check (issue 8 item 6): a 200-point what-if sweep must keep memory flat.

Prints the process's resident set size (RSS) every 20 points and the growth over the second
half of the sweep, when caches have warmed up. Run by hand:

    OMP_NUM_THREADS=1 python benchmarks/whatif_memory.py [--large]
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from kdplan import whatif as w
from kdplan.jobs import load_job

JOB = str(Path(__file__).resolve().parent.parent / "examples" / "seed" / "job.toml")
# 10 x 5 x 4 = 200 points. GPU count varies fastest, so every 4 points cover the whole range of
# problem sizes: RSS tracks the largest problem's working set after the first cycle, and any
# later growth is retained memory, not a bigger problem. Small GPU counts keep the check to a few
# minutes; --large sweeps 8..64 GPUs instead (slower: about 1 s of CPU per point).
AXES = ["global_batch=64..640+64", "kd.compression=auto,dense,topk:64,topk:64:8,topk:16:4", "gpus=1,2,4,8"]
LARGE = ["global_batch=128..640+128", "kd.compression=auto,dense,topk:64,topk:64:8,topk:16:4", "gpus=8..64+8"]


def rss_mib() -> float:
    """Current (not peak) resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    base = w.Base(spec=load_job(JOB), job_path=JOB)
    axes = w.parse_sweep(LARGE if "--large" in sys.argv[1:] else AXES)
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def on_point(i, n, row):
        if (i + 1) % 20 == 0 or i == 0:
            gc.collect()
            samples.append((i + 1, rss_mib()))
            print(f"point {i + 1:4d}/{n}  RSS {samples[-1][1]:7.1f} MiB  {time.perf_counter() - t0:6.1f} s", flush=True)

    start = rss_mib()
    res = w.run_sweep(base, axes, on_point=on_point)
    half = next(r for i, r in samples if i >= len(res.rows) // 2)
    print(f"{len(res.rows)} points in {time.perf_counter() - t0:.1f} s; RSS before {start:.1f} MiB, "
          f"at half {half:.1f} MiB, at end {samples[-1][1]:.1f} MiB "
          f"(second-half growth {samples[-1][1] - half:+.1f} MiB)")


if __name__ == "__main__":
    main()
