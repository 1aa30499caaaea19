"""Where a training step's time goes, executor side: a plan run under torchrun with timers on its
phases and torch.profiler on rank 0 for a few steps.

    python benchmarks/step_phases.py PLAN.json [--steps 12] [--top 25] [--cluster PROFILE]

Each rank prints, per step, the process CPU time and the wall time of: the colocated teacher's
phase (its forwards and the teacher-output encoding), the teacher-output encode and decode, the
student's forward, its loss forward, every backward (the loss's, the blocks', DDP's hooks and
gradient all-reduce), the optimizer step. Rank 0 then prints torch.profiler's operator table
(CPU time, steps 5-9 or as many as run; --top 0: no profiler, whose overhead inflates the
phases). The first 2 steps are not counted. Last, rank 0's phases side by side with the cost
model's breakdown of the same layout (kdplan.cost's role prices, on --cluster or the plan's
cluster): the table that says which phase a prediction misses. CPU time is what the rank computed; wall minus CPU is
waiting (on the other rank, or on a core another process holds): on 2 shared cores the load
average, printed, says which.

Run it with the repository root on PYTHONPATH (it launches `executor.launch` in-process).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(argv: list[str], top: int, report_path: str) -> int:
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
        Path(f"{report_path}.rank{rank}.phases.json").write_text(json.dumps(
            {"steps": n, "load": os.getloadavg()[0], "phases": {k.strip(): [v[0] / n, v[1] / n] for k, v in spent.items()}}))
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
    ap.add_argument("--cluster", help="profile to price the plan's layout with (default: the plan's cluster)")
    args = ap.parse_args()
    if args.worker:
        return _worker([args.plan, "--steps", str(args.steps), "--report", args.report], args.top, args.report) or 0
    world = json.loads(Path(args.plan).read_text()).get("world_size", 2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                          __file__, args.plan, "--steps", str(args.steps), "--top", str(args.top),
                          "--report", args.report, "--worker"], env=env, cwd=ROOT)
    measured = Path(f"{args.report}.rank0.phases.json")
    if rc == 0 and measured.exists():
        print(side_by_side(Path(args.plan), json.loads(measured.read_text()), args.cluster))
    return rc


# Measured phase (rank 0's timers, CPU ms per step) -> how it is formed from the timers above.
MEASURED = {
    "teacher forward": lambda p: p.get("teacher forward", 0.0),
    # the profile times the encoding with its decoding (GPUSpec.topk_passes / sample_passes)
    "teacher-output encode + decode": lambda p: p.get("teacher-output encode", 0.0) + p.get("teacher-output decode", 0.0),
    "student forward": lambda p: p.get("student forward (DDP)", 0.0),
    "loss (forward + backward)": lambda p: p.get("loss forward", 0.0) + p.get("loss backward", 0.0),
    "blocks backward (+ DDP)": lambda p: p.get("backward (loss + blocks + DDP)", 0.0) - p.get("loss backward", 0.0),
    "optimizer step": lambda p: p.get("optimizer step", 0.0),
}


def predicted_phases(plan_path: Path, cluster: str | None) -> dict[str, float]:
    """The cost model's own breakdown of the plan's layout, per phase as the executor runs them,
    per step on the slowest stage, from kdplan.cost's role prices (per micro-batch stage times x
    micro-batches): the teacher's forward (with its fixed framework costs) and its output
    encoding (its loss term), the student's forward, its loss over the vocabulary, the rest of
    its backward, the optimizer step and the exposed communication."""
    from kdplan.calibrate.calibrate import problem_and_candidate
    from kdplan.cost import price_student, price_teacher
    from kdplan.io import load_model
    from kdplan.profiles import load_cluster
    from kdplan.schema.plan import Plan
    plan = load_model(Plan, str(plan_path))
    problem, cand = problem_and_candidate(plan, load_cluster(cluster or plan.job.cluster))
    s = price_student(problem, cand.student, compression=cand.compression, mode=cand.mode, placement=cand.placement,
                      stage_layers=cand.student_stage_layers)
    out = {}
    if cand.teacher is not None and cand.mode == "online":
        t = price_teacher(problem, cand.teacher, compression=cand.compression)
        ts = max(t.stages, key=lambda x: x.per_micro_batch_s)
        out["teacher forward"] = t.num_micro_batches * (ts.busy_forward_s - ts.loss_s)
        out["teacher-output encode + decode"] = t.num_micro_batches * ts.loss_s
    st = max(s.stages, key=lambda x: x.per_micro_batch_s)
    m = s.num_micro_batches
    out["student forward"] = m * st.busy_forward_s
    out["loss (forward + backward)"] = m * st.loss_s
    out["blocks backward (+ DDP)"] = m * (st.busy_backward_s - st.loss_s)
    out["optimizer step"] = s.optimizer_s
    out["exposed communication"] = sum(s.comm_exposed_s.values()) + m * st.params_s
    return out


def side_by_side(plan_path: Path, measured: dict, cluster: str | None) -> str:
    """Rank 0's measured CPU ms per phase next to the cost model's prediction of the same phase."""
    pred = predicted_phases(plan_path, cluster)
    ph = {k: v[0] for k, v in measured["phases"].items()}  # CPU seconds per step
    where = cluster or "the plan's cluster"
    rows = [(k, MEASURED[k](ph) * 1e3 if k in MEASURED else None, pred.get(k, 0.0) * 1e3) for k in pred]
    lines = [f"\nrank 0, per step ({measured['steps']} steps, load average {measured['load']:.1f}): measured CPU ms"
             f" vs the cost model's ms ({where})",
             f"  {'phase':<30}{'measured':>10}{'predicted':>11}{'ratio':>8}"]
    for k, meas, p in rows:
        ratio = f"{meas / p:8.2f}" if meas is not None and p > 0 else f"{'-':>8}"
        lines.append(f"  {k:<30}{meas if meas is not None else float('nan'):10.1f}{p:11.1f}{ratio}")
    tm = sum(x for _, x, _ in rows if x is not None)
    tp = sum(p for _, _, p in rows)
    lines.append(f"  {'sum':<30}{tm:10.1f}{tp:11.1f}{tm / tp if tp else float('nan'):8.2f}")
    lines.append("  (measured: process CPU time, waits on the other rank excluded; the exposed communication is wall "
                 "time, not measured here)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
