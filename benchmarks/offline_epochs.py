"""3 epochs from the offline teacher-output cache against 3 online epochs (issue 16), measured.

    python benchmarks/offline_epochs.py [--epochs 3] [--rows 32]

Both runs are the tiny CPU example's plan (examples/tiny-cpu: its 8,192-token tokenizer, its
2 x 128 student, real text), data parallel on 2 gloo processes, over a fixed dataset of
``rows`` sequences (plan job.dataset_tokens) for ``epochs`` epochs, same seed, same data order,
same teacher-output format (the planner's choice for the example, sample:64). Only kd.mode
differs: online runs the teacher forward in every step of every epoch; offline runs it once per
sample (the pass that writes the cache), then every epoch reads the cache.

The teacher is a randomly initialised Llama of the example's family, 8 x 512 (34M parameters,
13x the student's 2.5M, as GPT-13B is 10x GPT-1.3B). In FLOPs its forward is ~7x the student's
training step (29.5M multiply-adds per token against 3 x 1.44M); on a CPU the student's step
costs more than its FLOPs (the KD loss over 8,192 ids, Adam, small matmuls), and a 6 x 320
teacher (2x in FLOPs) saved only ~19% of the CPU time over 3 epochs, a smaller teacher share
than the ~2/3 of a GPT-13B -> GPT-1.3B co-located step; the shipped, trained 4 x 256 teacher
is smaller still. Its weights do not matter for speed or for the comparison of losses (both
runs use the same teacher).

What is timed: ``executor.train.train`` on every rank (building both models, the offline pass,
every step): the same work a `kdplan run` does after start-up, which is the same for both runs
and left out. X is the ratio of the busiest rank's CPU time (time.process_time, one torch
thread per rank), which on a dedicated machine is the wall time of this compute-bound work; the
wall-clock ratio is printed too. On the 2 cores this was written on, shared with other jobs
(load average 7-10), wall-clock ratios of identical runs ranged from 0.7x to 3.0x: they
measured the neighbours, not the cache. Losses are compared step by step; "identical" means within 1e-6
relative (a restart of an offline run reproduces them exactly: tests/test_exec_epochs.py).

The last line is ``3 epochs from the cache: X.XXx faster than 3 online epochs (losses
identical: yes|no)``; ``measure_offline_epochs`` returns (X, identical) for other scripts
(benchmarks/multi_student.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("KDPLAN_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOB = ROOT / "examples" / "tiny-cpu" / "job.toml"
REL = 1e-6  # "identical" losses: within this relative tolerance, step by step
TEACHER_LAYERS, TEACHER_HIDDEN, TEACHER_FFN = 8, 512, 1376


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, plan_path: str, steps: int, result: str, clock: str = "cpu") -> None:
    """One rank: the plan checked as `kdplan run` checks it (launch.check), the inputs prepared
    (tokenizer and packed rows cached in the shared work directory), then train() timed between
    barriers (rank 0 writes the result). ``clock = "cpu"``: the executor's own step and span
    timers (executor.measure) read this process's CPU time instead of the wall clock, so the
    per-step numbers of the report are on the same clock as the ratio."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import types

    import torch
    import torch.distributed as dist

    import executor.measure as measure
    from executor.launch import check, load_plan, prepare
    from executor.train import train

    if clock == "cpu":
        measure.time = types.SimpleNamespace(perf_counter=time.process_time)
    torch.set_num_threads(1)
    # as `kdplan run` on a CPU (executor.launch.run): freed host memory kept. Without it glibc
    # hands back blocks of 32 MiB and more (a micro-batch of 8 x 128 tokens' fp32 logits over
    # V = 8,192) and faults them in again every micro-batch: the tiny head and loss 2.3x slower
    # per element at 32 MiB (measured 2026-12-05), a regime the executor does not run in.
    from executor.hostmem import retain_host_memory
    retain_host_memory()
    plan = load_plan(plan_path)
    check(plan, world_size=world, device="cpu")
    inputs = prepare(plan, Path(plan.run.output_dir).parent)
    inputs.out_dir = Path(plan.run.output_dir)
    inputs.checkpoint_dir = inputs.out_dir / "checkpoints" / "bench"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=20))
    try:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        stats, _, _ = train(plan, inputs, steps=steps, resume=False, progress=False)
        cpu = time.process_time() - c0  # before the barrier: a rank waiting for a slower one is not working
        dist.barrier()
        elapsed = time.perf_counter() - t0
        cpus = [None] * world
        dist.all_gather_object(cpus, cpu)
        if rank == 0:
            rep = next(s for s in stats if s.losses)
            Path(result).write_text(json.dumps({
                "elapsed_s": elapsed, "cpu_s": max(cpus), "losses": [x[1] for x in rep.losses],
                "steps_s": sum(rep.step_times_s), "step_times_s": rep.step_times_s, "teacher_s": rep.teacher_s,
                "loss_terms": [list(x[1:]) for x in rep.losses],
                "students": [{"student": st.source, "step_times_s": st.step_times_s,
                              "loss_terms": [list(x[1:]) for x in st.losses]} for st in rep.students]}))
    finally:
        dist.destroy_process_group()


def _plans(work: Path, rows: int, nproc: int):
    """(online plan, offline plan): the tiny example planned offline on ``nproc`` processes, its
    teacher swapped for the larger random one, over ``rows`` sequences; online differs in kd.mode only."""
    from executor.models import build_model, materialize, save_checkpoint
    from kdplan.jobs import load_job, resolve
    from kdplan.planner import make_plan

    pins = ["kd.mode=offline", "kd.placement=colocated", f"student.dp={nproc}", f"teacher.dp={nproc}",
            "student.tp=1", "student.pp=1", "teacher.tp=1", "teacher.pp=1"]
    plan = make_plan(resolve(load_job(str(JOB)), pins=pins, overrides={"gpus": nproc}, job_path=str(JOB)), top_k=0)
    t = plan.teacher.model
    teacher = t.model_copy(update={"name": f"random-{TEACHER_LAYERS}x{TEACHER_HIDDEN}", "num_layers": TEACHER_LAYERS,
                                   "hidden_size": TEACHER_HIDDEN, "num_heads": TEACHER_HIDDEN // t.head_dim,
                                   "num_kv_heads": TEACHER_HIDDEN // t.head_dim, "ffn_hidden_size": TEACHER_FFN})
    ckpt = work / "teacher"
    save_checkpoint(materialize(build_model(teacher), seed=7), ckpt)
    seq = plan.job.seq_len
    offline = plan.model_copy(update={
        # the teacher's layout re-cut for its own depth (the planned stages cut the example's 4 layers:
        # kept, they would run the first 4 of the 8 layers, as this script did before launch.check ran here)
        "teacher": plan.teacher.model_copy(update={"model": teacher, "layout": plan.teacher.layout.model_copy(
            update={"stages": []})}),
        "job": plan.job.model_copy(update={"dataset_tokens": float(rows * seq)}),
        "run": plan.run.model_copy(update={"teacher_checkpoint": str(ckpt), "checkpoint_every": 0})})
    online = offline.model_copy(update={"kd": offline.kd.model_copy(update={"mode": "online"})})
    return online, offline


def run_plan(plan, work: Path, name: str, steps: int, nproc: int, clock: str = "cpu") -> dict:
    """``steps`` steps of ``plan`` in ``nproc`` spawned gloo processes (output under ``work / name``),
    timed on ``clock`` (see _worker); the reporting rank's result."""
    import torch.multiprocessing as mp

    plan = plan.model_copy(update={"run": plan.run.model_copy(update={"output_dir": str(work / name)})})
    path = work / f"{name}.json"
    path.write_text(plan.model_dump_json(indent=1))
    result = work / f"{name}.result.json"
    mp.start_processes(_worker, args=(nproc, _free_port(), str(path), steps, str(result), clock), nprocs=nproc,
                       start_method="spawn")
    return json.loads(result.read_text())


def measure_offline_epochs(*, epochs: int = 3, rows: int = 32, nproc: int = 2, repeats: int = 1,
                           verbose: bool = True, clock: str = "cpu") -> tuple[float, bool]:
    """(online time / offline time, losses identical within REL) of ``epochs`` epochs over
    ``rows`` sequences on ``nproc`` gloo processes, time being the busiest rank's CPU time in
    train() (``clock="cpu"``, see the module docstring) or its wall time (``clock="wall"``); the
    other ratio is printed too. Each offline run
    starts from an empty cache, so its time includes the teacher pass that writes it. With
    ``repeats`` > 1 the modes alternate and each keeps its fastest run."""
    with tempfile.TemporaryDirectory(prefix="kdplan-offline-epochs-") as tmp:
        work = Path(tmp)
        online, offline = _plans(work, rows, nproc)
        steps = epochs * rows // online.job.global_batch
        runs = {"online": [], "offline": []}
        for i in range(repeats):
            for name, plan in (("online", online), ("offline", offline)):
                runs[name].append(run_plan(plan, work, f"{name}-{i}", steps, nproc, clock))
    key = "cpu_s" if clock == "cpu" else "elapsed_s"
    on, off = (min(runs[k], key=lambda r: r[key]) for k in ("online", "offline"))
    every = [r["losses"] for k in runs for r in runs[k]]
    identical = all(len(x) == steps for x in every) and all(
        math.isclose(a, b, rel_tol=REL) for x in every[1:] for a, b in zip(every[0], x))
    speedup = on[key] / off[key]
    if verbose:
        diff = max(abs(a - b) / abs(a) for x in every[1:] for a, b in zip(every[0], x))
        print(f"{epochs} epochs x {rows} sequences of {online.job.seq_len} tokens ({steps} steps of global batch"
              f" {online.job.global_batch}), {nproc} gloo processes, teacher outputs {online.kd.compression};"
              f" teacher {online.teacher.model.name} ({TEACHER_LAYERS} x {TEACHER_HIDDEN}), student"
              f" {online.student.model.num_layers} x {online.student.model.hidden_size}")
        for k, what in (("online", "teacher every epoch"), ("offline", "teacher pass + cache")):
            times = ", ".join(f"CPU {r['cpu_s']:.2f} s, wall {r['elapsed_s']:.2f} s ({r['steps_s']:.2f} s in steps)"
                              for r in runs[k])
            print(f"{k:8} ({what}): {times}")
        other = "elapsed_s" if clock == "cpu" else "cpu_s"
        print(f"{'wall-clock' if clock == 'cpu' else 'CPU-time'} ratio {on[other] / off[other]:.2f}x"
              + (" (on this shared machine, mostly its load)" if clock == "cpu" else ""))
        print(f"largest relative loss difference over the {len(every)} runs: {diff:.2e} (identical: within {REL:g})")
    return speedup, identical


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=32, help="sequences in the fixed dataset (whole global batches)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating; the fastest counts")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = ap.parse_args(argv)
    speedup, identical = measure_offline_epochs(epochs=a.epochs, rows=a.rows, nproc=a.nproc, repeats=a.repeats,
                                                clock=a.clock)
    print(f"{a.epochs} epochs from the cache: {speedup:.2f}x faster than {a.epochs} online epochs "
          f"(losses identical: {'yes' if identical else 'no'})")


if __name__ == "__main__":
    main()
