"""Where a training step's time goes, executor side: a plan run under torchrun with timers on its
phases and torch.profiler on rank 0 for a few steps.

    python benchmarks/step_phases.py PLAN.json [--steps 12] [--top 25]

Each rank prints, per step, the process CPU time and the wall time of: the colocated teacher's
phase (its forwards and the teacher-output encoding), the teacher-output encode and decode, the
student's forward, its loss forward, every backward (the loss's, the blocks', DDP's hooks and
gradient all-reduce), the optimizer step. Rank 0 then prints torch.profiler's operator table
(CPU time, steps 5-9 or as many as run). CPU time is what the rank computed; wall minus CPU is
waiting (on the other rank, or on a core another process holds): on 2 shared cores the load
average, printed, says which.

Run it with the repository root on PYTHONPATH (it launches `executor.launch` in-process).
"""

from __future__ import annotations

import atexit
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(argv: list[str], top: int) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import executor.teacher as teacher
    import executor.train as train
    from torch.nn.parallel import DistributedDataParallel as DDP

    spent = collections.defaultdict(lambda: [0.0, 0.0, 0])
    steps = [0]
    warmup = 2

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def timed(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                e = spent[label]
                e[0] += time.process_time() - c
                e[1] += time.perf_counter() - w
                e[2] += 1
        setattr(owner, name, timed)

    wrap(teacher.Targets, "teacher_phase", "teacher phase (forwards + encode)")
    wrap(teacher.TeacherRunner, "logits", "  teacher forward")
    wrap(teacher, "encode", "  teacher-output encode")
    wrap(teacher, "decode", "teacher-output decode")
    wrap(DDP, "forward", "student forward (DDP)")
    wrap(train, "_kd", "loss forward")
    wrap(torch.Tensor, "backward", "backward (loss + blocks + DDP)")
    # The loss's own backward ends when the gradient of the logits it was given is ready: a hook
    # on them splits "backward" into the loss's part and the blocks' (+ DDP's) part.
    kd_loss = train._kd
    mark: list[tuple[float, float]] = []

    def kd_split(logits, *a, **k):
        if logits.requires_grad:
            logits.register_hook(lambda g: mark.append((time.process_time(), time.perf_counter())) or None)
        return kd_loss(logits, *a, **k)
    train._kd = kd_split
    backward = torch.Tensor.backward

    def backward_split(self, *a, **k):
        mark.clear()
        c, w = time.process_time(), time.perf_counter()
        r = backward(self, *a, **k)
        if mark:
            e = spent["  loss backward"]
            e[0] += mark[0][0] - c
            e[1] += mark[0][1] - w
            e[2] += 1
        return r
    torch.Tensor.backward = backward_split
    prof = (profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=4, warmup=1, active=5, repeat=1))
            if top > 0 else None)
    if prof is not None:
        prof.start()
    step = torch.optim.AdamW.step

    def opt_step(self, *a, **k):
        c, w = time.process_time(), time.perf_counter()
        r = step(self, *a, **k)
        e = spent["optimizer step"]
        e[0] += time.process_time() - c
        e[1] += time.perf_counter() - w
        e[2] += 1
        steps[0] += 1
        if steps[0] == warmup:  # the first steps build caches and buffers: not counted
            spent.clear()
        if prof is not None:
            prof.step()
        return r
    torch.optim.AdamW.step = opt_step

    @atexit.register
    def report() -> None:
        if prof is not None:
            prof.stop()
        rank, n = os.environ.get("RANK", "?"), max(steps[0] - warmup, 1)
        lines = [f"rank {rank}: per step over {n} steps after {warmup} warm-up (CPU ms / wall ms), load average {os.getloadavg()[0]:.1f}"]
        lines += [f"  {k:<36}{v[0] / n * 1e3:9.1f}{v[1] / n * 1e3:9.1f}" for k, v in spent.items()]
        print("\n".join(lines), file=sys.stderr, flush=True)
        if rank == "0" and prof is not None:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), file=sys.stderr)

    from executor.launch import main
    return main(argv)


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", default="/tmp/step-phases-report.json")
    args = ap.parse_args()
    if args.worker:
        return _worker([args.plan, "--steps", str(args.steps), "--report", args.report], args.top) or 0
    import json
    world = json.loads(Path(args.plan).read_text()).get("world_size", 2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                            __file__, args.plan, "--steps", str(args.steps), "--top", str(args.top),
                            "--report", args.report, "--worker"], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
