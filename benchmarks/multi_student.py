"""Two students in one job against two separate runs, measured on this machine (issue 16).

    python benchmarks/multi_student.py [--job examples/tiny-cpu/job.toml]
        [--student-b examples/tiny-cpu/student-b/config.json] [--steps 6] [--rounds 2] [--gpus 1]
        [--global-batch 8] [--out DIR] [--offline-epochs 3] [--clock cpu|wall]

Both lines this script prints are measured with the same clock on the same number of processes:
by default the CPU time of the process (time.process_time, one torch thread; on a dedicated machine
it is the wall time of this compute-bound work, on a shared one it leaves out the time other jobs
hold the core) on 1 process (``--gpus 1``): the executor's own step and span timers
(executor.measure) read that clock in the benchmark's processes, which run executor.train.train
in-process after the checks `kdplan run` makes (launch.check). ``--clock wall`` uses the wall clock
for both. The machine's load average is printed before and after.

First (unless ``--offline-epochs 0``) benchmarks/offline_epochs.py's comparison: 3 epochs read
from the teacher-output cache (the one-off teacher pass that writes it included) against 3 online
epochs, the time of train() (see that script), on the same clock and process count; and 3 epochs
of online_then_cache (the first online, writing the cache as it trains; the later two reading it)
against the 3 online epochs and against offline (teacher pass + 3 cached epochs).

Then two students:

1. ``kdplan plan JOB --student <the job's student> --student STUDENT_B --tokens 1e6 --gpus 1
   --global-batch 8``: the job planner prices the whole job and, where it chooses ``online_fanout``,
   the plan carries the second student in ``extra_students`` (the script stops, saying why, if it
   does not).
2. That plan (one teacher forward per batch feeds both students; the teacher's side of the KD loss
   computed once per batch, executor.kd.losses.prepare_target), then each student alone
   (Plan.student_alone: the same teacher, layout, seed and data order; a run of one student
   prepares each micro-batch's target once too, in its loss, executor.train._kd, so both sides
   run the same loss kernels), in ``--rounds`` rounds of (job, A alone, B alone) so that a load
   drifting on a shared machine hits all three.
3. Speedup = (median step time of student A alone + of student B alone) / median step time of
   the two-student job (medians over every round's steps after the executor's warm-up). Losses
   identical: every student's per-step (total, kd, ce) in every job round equals its run alone,
   exactly. The decomposition printed with it: the job's teacher phase T (the forward, the
   teacher-output encode and decode, the teacher's side of the loss prepared once) and each
   student's own span, S = their sum; each run alone: its teacher phase (the forward, encode and
   decode) and its own span (its loss preparing its target included); a joint step saves one
   teacher phase, so the ratio is about (2T + S) / (T + S), and 1.3 needs T >= 0.43 S.

Sizes (parameters, embeddings and head included): student A the shipped 2 x 128 (2.5M), student B
2 x 192 (4.0M), and by default (``--teacher large``) the teacher of the offline-epochs comparison
above, a random 8 x 512 Llama of the example's family (33.7M: 13.5x A, 8.4x B, as GPT-13B is 10x
GPT-1.3B and 4.8x GPT-2.7B, the students of issue 16's first done-when command; its weights do
not matter for speed, and the losses are compared between runs with the same teacher).
``--teacher shipped`` uses the example's trained 4 x 256 teacher (7.4M: 3.0x A, 1.8x B), smaller
than in the distillations people run (Minitron 15B -> 8B is 1.9x, Llama 3.1 8B -> 3.2 1B 8x):
measured 1.18-1.21x in session 7 (T/S = 0.21). The default teacher, idle (2026-12-05 06:15 and
06:17, load 0.7-1.0): 1.50x and 1.48x (T/S = 0.99), losses identical; 3 cached epochs 1.75x / 1.71x
(benchmarks/results/multi-student-2026-12-05). Numbers come from a shared 2-core VM: noisy;
they say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB = ROOT / "examples" / "tiny-cpu" / "job.toml"
STUDENT_B = ROOT / "examples" / "tiny-cpu" / "student-b" / "config.json"


def kdplan(*args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", KDPLAN_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-m", "kdplan.cli.main", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kdplan {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def timed(series: list[list[float]]) -> float:
    """Median over every timed step (after the executor's warm-up) of every round."""
    from executor.train import WARMUP_STEPS
    return statistics.median(t for xs in series for t in (xs[WARMUP_STEPS:] or xs))


def two_students(job: Path = JOB, student_b: Path = STUDENT_B, steps: int = 6, rounds: int = 2, gpus: int = 1,
                 global_batch: int = 8, out: Path | None = None, clock: str = "cpu",
                 teacher: str = "large") -> tuple[float, bool, list[str]]:
    """(speedup of the two-student job over two separate runs, losses identical, lines to print).
    ``teacher``: "large" (offline_epochs.large_teacher, the random 8 x 512 Llama) or "shipped"
    (the job's own teacher and checkpoint)."""
    from kdplan.schema import Plan
    from offline_epochs import large_teacher, run_plan

    out = Path(out or tempfile.mkdtemp(prefix="kdplan-multi-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = tomllib.loads(job.read_text())
    student_a = (job.parent / spec["student"]).resolve()
    plan_path = out / "plan-two-students.json"
    extra = []
    if teacher == "large":
        config, ckpt = large_teacher(job.parent / spec["teacher"], out)
        extra = ["--teacher", config]
    kdplan("plan", job, *extra, "--student", student_a, "--student", student_b.resolve(), "--tokens", "1e6",
           "--gpus", gpus, "--global-batch", global_batch, "-o", plan_path)
    plan = Plan.model_validate_json(plan_path.read_text())
    if teacher == "large":
        plan = plan.model_copy(update={"run": plan.run.model_copy(update={"teacher_checkpoint": str(ckpt)})})
    job_pred = plan.prediction.job
    if not plan.extra_students:
        sys.exit(f"the job planner chose {job_pred.strategy if job_pred else 'no whole job'}, not online_fanout:"
                 f" the plan trains one student ({job_pred.reason if job_pred else ''})")
    plans = {"job": plan, "a": plan.student_alone(0), "b": plan.student_alone(1)}
    # rounds of (job, a, b), one after another: a load that drifts on a shared machine hits all three
    res = {n: [] for n in plans}
    for r in range(rounds):
        for n, p in plans.items():
            res[n].append(run_plan(p, out, f"{n}-{r}", steps, plan.world_size, clock))
    t_job, t_a, t_b = (timed([x["step_times_s"] for x in res[n]]) for n in ("job", "a", "b"))
    t_teacher = timed([x["teacher_s"] for x in res["job"]])
    own = [timed([x["students"][k]["step_times_s"] for x in res["job"]]) for k in range(2)]
    # each run alone: its teacher phase (forward, encode, decode) and the rest of its step (its own span)
    alone_t = {n: timed([x["teacher_s"] for x in res[n]]) for n in ("a", "b")}
    alone_own = {n: timed([[s - t for s, t in zip(x["step_times_s"], x["teacher_s"])] for x in res[n]])
                 for n in ("a", "b")}
    same = all(rep["students"][k]["loss_terms"] == alone["loss_terms"]
               for k, n in enumerate(("a", "b")) for rep, alone in zip(res["job"], res[n]))
    S = sum(own)
    name = lambda k: Path(plan.students[k].source).parent.name  # noqa: E731
    t_m = plan.teacher.model
    lines = [f"teacher: {t_m.name} ({t_m.num_layers} x {t_m.hidden_size}, "
             f"{'random weights' if teacher == 'large' else 'the shipped checkpoint'})",
             f"plan: {plan.world_size} process(es), kd {plan.kd.mode} {plan.kd.placement} {plan.kd.compression};"
             f" clock: {'CPU time of the process' if clock == 'cpu' else 'wall'}",
             f"median over {rounds} round(s) x {steps} steps (after each run's warm-up)",
             f"job planner: {job_pred.strategy}, predicted {job_pred.speedup_vs_separate_mirror:.2f}x vs separate"
             " mirror-KD jobs",
             f"{'run':44s}{'median step (s)':>16s}",
             f"{'two students, one teacher forward':44s}{t_job:16.4f}",
             f"{'  teacher phase T (forward, encode, prepare)':44s}{t_teacher:16.4f}"]
    lines += [f"{'  student ' + 'AB'[k] + ' own span (' + name(k) + ')':44s}{own[k]:16.4f}" for k in range(2)]
    for k, (n, t) in enumerate((("a", t_a), ("b", t_b))):
        lines += [f"{'student ' + 'AB'[k] + ' alone (' + name(k) + ')':44s}{t:16.4f}",
                  f"{'  teacher phase (forward, encode)':44s}{alone_t[n]:16.4f}",
                  f"{'  own span (its loss prepares its target)':44s}{alone_own[n]:16.4f}"]
    s_alone = alone_own["a"] + alone_own["b"]
    lines += [f"{'A + B, two separate runs':44s}{t_a + t_b:16.4f}",
              f"separate runs: two teacher phases {alone_t['a'] + alone_t['b']:.4f} s + own spans {s_alone:.4f} s;"
              f" the job: one teacher phase (one prepare included) {t_teacher:.4f} s + own spans {S:.4f} s; own spans"
              f" alone - in the job = {s_alone - S:+.4f} s (the targets' preparation, which the job does once in its"
              " teacher phase, and noise)",
              f"decomposition: T = {t_teacher:.4f} s, S = both students' own spans = {S:.4f} s, T/S = "
              f"{t_teacher / S:.2f}; (2T + S) / (T + S) = {(2 * t_teacher + S) / (t_teacher + S):.2f}x expected from"
              " sharing one teacher phase; 1.3x needs T/S >= 0.43 (the teacher phase at least 0.43x both students'"
              " own work together)"]
    return (t_a + t_b) / t_job, same, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", type=Path, default=JOB)
    ap.add_argument("--student-b", type=Path, default=STUDENT_B)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the executor times those after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2, help="(job, A alone, B alone) repeated this many times")
    ap.add_argument("--gpus", type=int, default=1, help="processes (cpu-local 'GPUs') for both measurements")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="the clock of both measurements: the process's CPU time (default) or the wall clock")
    ap.add_argument("--teacher", choices=("large", "shipped"), default="large",
                    help="the two-student comparison's teacher: 'large', the random 8 x 512 Llama the offline-epochs"
                         " comparison uses (33.7M parameters: 13.5x student A's 2.5M, 8.4x student B's 4.0M, as GPT-13B is"
                         " 10x GPT-1.3B and 4.8x GPT-2.7B), or 'shipped', the example's trained 4 x 256 (7.4M: 3.0x"
                         " and 1.8x)")
    ap.add_argument("--offline-epochs", type=int, default=3,
                    help="also measure this many epochs read from the teacher-output cache against as many online"
                         " epochs (benchmarks/offline_epochs.py, same clock and processes); 0 skips it")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    clock = "CPU time of each process (time.process_time)" if args.clock == "cpu" else "wall clock"
    print(f"both measurements: {clock}, {args.gpus} process(es); load average {os.getloadavg()[0]:.1f} at start",
          flush=True)
    if args.offline_epochs:
        from offline_epochs import measure_epochs, online_then_cache_lines
        e = args.offline_epochs
        t, off_same = measure_epochs(modes=("online", "offline", "online_then_cache"), epochs=e, nproc=args.gpus,
                                     clock=args.clock)
        print(f"{e} epochs from the cache: {t['online'] / t['offline']:.2f}x faster than {e} online epochs "
              f"(losses identical: {'yes' if off_same else 'no'})", flush=True)
        print("\n".join(online_then_cache_lines(e, t, off_same)), flush=True)
    speedup, same, lines = two_students(args.job, args.student_b, args.steps, args.rounds, args.gpus,
                                        args.global_batch, args.out, args.clock, args.teacher)
    print("\n".join(lines))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"two students in one job: {speedup:.2f}x faster than two separate runs"
          f" (losses identical: {'yes' if same else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
