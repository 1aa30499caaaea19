"""Load check (issue 8 item 6): a long CPU distillation run keeps memory flat.

Plans examples/tiny-cpu, runs it for --steps steps (default 1,000) with `kdplan run`, and samples
the resident memory (RSS, from /proc) of every executor process every --every seconds. Prints
RSS over time, then the growth after warm-up: the median RSS of the last fifth of the samples
minus that of the second fifth, per rank.

    OMP_NUM_THREADS=1 python benchmarks/run_memory.py --steps 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def executor_rss_mib(marker: str) -> dict[int, float]:
    """RSS (MiB) of each live `executor.launch` worker of this run, keyed by pid."""
    out: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "executor.launch" not in cmd or marker not in cmd or "torchrun" in cmd or "torch.distributed.run" in cmd:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[int(d.name)] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = ap.parse_args()
    kdplan = [sys.executable, "-m", "kdplan.cli.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="kdplan-runmem-") as tmp:
        plan = Path(tmp) / "plan.json"
        subprocess.run([*kdplan, "plan", str(ROOT / "examples/tiny-cpu/job.toml"), "-o", str(plan), "--top", "0"],
                       check=True, env=env, capture_output=True, cwd=tmp)
        run = subprocess.Popen([*kdplan, "run", str(plan), "--steps", str(args.steps), "--report",
                                str(Path(tmp) / "report.json")], env=env, cwd=tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples: list[dict[int, float]] = []
        t0 = time.time()
        print(f"{'elapsed s':>9}  RSS per worker (MiB)")
        while run.poll() is None:
            rss = executor_rss_mib(str(plan))
            if rss:
                samples.append(rss)
                print(f"{time.time() - t0:9.0f}  " + "  ".join(f"{v:7.1f}" for _, v in sorted(rss.items())), flush=True)
            time.sleep(args.every)
        if run.returncode != 0:
            sys.exit(f"kdplan run exited {run.returncode}")
    pids = sorted({p for s in samples for p in s})
    n = len(samples)
    if n < 10:
        sys.exit(f"only {n} samples: run longer (--steps) or sample more often (--every)")
    for rank, pid in enumerate(pids):
        series = [s[pid] for s in samples if pid in s]
        k = max(1, len(series) // 5)
        early = statistics.median(series[k:2 * k])
        late = statistics.median(series[-k:])
        print(f"worker {rank}: RSS after warm-up {early:.1f} MiB, at the end {late:.1f} MiB, "
              f"growth {late - early:+.1f} MiB ({(late - early) / early:+.1%}) over {args.steps} steps")


if __name__ == "__main__":
    main()
