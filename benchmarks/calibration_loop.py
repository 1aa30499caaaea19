"""The loop of design.md section 2 on this machine: profile -> plan -> run -> calibrate -> predict.

    python benchmarks/calibration_loop.py [--steps 10] [--repeats 2] [--calibrate-on 7] [--out runs/calibration-loop]

1. `kdplan profile --quick --base cpu-local` measures this machine (gloo, CPU processes);
2. `kdplan plan examples/tiny-cpu/job.toml --cluster PROFILE --fix ...` plans several different
   layouts of the tiny example (data, tensor and pipeline parallel, compression, ZeRO, placement);
3. `kdplan run PLAN --steps N --report REPORT` runs each one, --repeats times round-robin, keeping
   each layout's fastest run (the machine is shared: the others' bursts inflate single runs);
4. `kdplan calibrate` fits the cost model to the first --calibrate-on reports;
5. the calibrated profile predicts the other runs' layouts (the exact layouts that ran, priced by
   kdplan.cost.evaluate): their errors before (the plan's own prediction) and after are printed.

Last line: ``held-out step-time error: before X%, after Y%; peak-memory error: Z%`` (mean absolute
relative errors over the held-out runs; peak memory with the calibrated profile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdplan.calibrate.calibrate import load_case, predict, rel_err  # noqa: E402
from kdplan.profiles import load_cluster  # noqa: E402

JOB = ROOT / "examples" / "tiny-cpu" / "job.toml"

# Calibration runs first: one per layout family (data, tensor, pipeline parallel, disaggregated
# teacher) and one per cost factor moved away from the base dp2 run (micro-batch 8, top-k teacher
# outputs, ZeRO-3): a factor the calibration runs never vary cannot be fitted (the loss over the
# vocabulary grows faster than linearly with the micro-batch once it leaves the cache, and with
# micro-batch 2 only, the fit cannot tell it from matmul efficiency). Held out: layouts that
# combine the factors in ways no calibration run does, chosen before they were run. Everything
# that changes the cost is pinned, so each run is the layout named here.
_PIN = ["teacher.offload=none", "kd.mode=online", "student.recompute=none"]
_DENSE = ["kd.compression=dense", "kd.placement=colocated", "student.zero=0"]
_TOPK = ["kd.compression=topk:64", "kd.placement=colocated", "student.zero=0"]
_DISAGG = ["kd.placement=disaggregated", "student.zero=0", "student.dp=1", "teacher.dp=1"]
LAYOUTS: list[tuple[str, list[str]]] = [
    ("dp2", _PIN + _DENSE + ["student.dp=2", "teacher.dp=2", "student.micro_batch=2"]),
    ("tp2", _PIN + _DENSE + ["student.tp=2", "teacher.tp=2", "student.micro_batch=2"]),
    ("pp2", _PIN + _DENSE + ["student.pp=2", "teacher.pp=2", "student.micro_batch=2"]),
    ("disaggregated", _PIN + _DISAGG + ["kd.compression=dense", "student.micro_batch=2"]),
    ("dp2-mb8", _PIN + _DENSE + ["student.dp=2", "teacher.dp=2", "student.micro_batch=8"]),
    ("dp2-topk64", _PIN + _TOPK + ["student.dp=2", "teacher.dp=2", "student.micro_batch=2"]),
    ("dp2-zero3", _PIN + ["kd.compression=dense", "kd.placement=colocated", "student.zero=3",
                          "student.dp=2", "teacher.dp=2", "student.micro_batch=2"]),
    # held out
    ("tp2-mb8", _PIN + _DENSE + ["student.tp=2", "teacher.tp=2", "student.micro_batch=8"]),
    ("pp2-mb4", _PIN + _DENSE + ["student.pp=2", "teacher.pp=2", "student.micro_batch=4"]),
    ("dp2-mb4-topk64", _PIN + _TOPK + ["student.dp=2", "teacher.dp=2", "student.micro_batch=4"]),
    ("disagg-topk64", _PIN + _DISAGG + ["kd.compression=topk:64", "student.micro_batch=4"]),
]
CALIBRATE_ON = 7


def kdplan(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kdplan.cli.main", *map(str, args)]
    print("$ kdplan " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_plan(plan: Path, report: Path, steps: int) -> subprocess.CompletedProcess:
    # the first run of the tiny example also pre-trains its teacher (cached): allow for it
    try:
        return kdplan("run", plan, "--steps", steps, "--report", report, timeout=3600)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 124, "", "timed out after 3600 s")


def job_models(path: Path) -> list[str]:
    """The job's teacher and student (paths relative to the job file), for the profile's shapes."""
    import tomllib
    job = tomllib.loads(path.read_text())
    out = []
    for role in ("teacher", "student"):
        name = job.get(role)
        if name:
            p = path.parent / name
            out.append(str(p) if p.exists() else name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="runs per layout; each keeps its fastest (least disturbed)")
    ap.add_argument("--calibrate-on", type=int, default=CALIBRATE_ON, help="how many of the runs (in LAYOUTS order) to fit")
    ap.add_argument("--out", default=str(ROOT / "runs" / "calibration-loop"))
    ap.add_argument("--profile", help="use this profile instead of measuring one")
    ap.add_argument("--job", default=str(JOB), help="job TOML to plan (default: the tiny CPU example)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the plans and reports already under --out (re-fit and re-predict only)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = Path(args.job)
    if not job.exists():
        print(f"{job} is missing", file=sys.stderr)
        return 2

    t0, load0 = time.time(), os.getloadavg()[0]
    profile = Path(args.profile) if args.profile else out / "profile.yaml"
    if not args.profile and not (args.reuse and profile.exists()):
        r = kdplan("profile", "--quick", "--base", "cpu-local", "--models", ",".join(job_models(job)), "-o", profile)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        print(r.stdout.strip())

    # Plan every layout, then run them --repeats times round-robin: each layout keeps its least
    # disturbed run (lowest median step time), the same rule for the runs fitted and held out,
    # so that a burst of other work on the shared cores lands on one repeat, not on the result.
    planned: list[tuple[str, Path]] = []
    for name, fixes in LAYOUTS:
        d = out / name
        d.mkdir(exist_ok=True)
        if args.reuse and (d / "report.json").exists() and (d / "plan.json").exists():
            planned.append((name, d))
            continue
        pins = [x for f in fixes for x in ("--fix", f)]
        r = kdplan("plan", job, "--cluster", profile, *pins, "-o", d / "plan.json", "--json")
        if r.returncode:
            print(f"  skip {name}: plan failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        planned.append((name, d))
    runs: dict[str, list[float]] = {name: [] for name, _ in planned}
    for rep in range(args.repeats):
        for name, d in planned:
            if args.reuse and (d / "report.json").exists():
                continue
            rp = d / f"report-{rep}.json"
            r = run_plan(d / "plan.json", rp, args.steps)
            if r.returncode or not rp.exists():
                lines = [ln for ln in r.stderr.splitlines() if "rror" in ln or "efus" in ln] or r.stderr.splitlines()
                tail = lines[-1].strip() if lines else f"exit {r.returncode}"
                print(f"  {name} repeat {rep}: run failed: {tail}")
                continue
            step = json.loads(rp.read_text())["measured"]["step_time_s"]
            runs[name].append(step)
            if step <= min(runs[name]):
                shutil.copyfile(rp, d / "report.json")
    reports = [(name, d / "report.json") for name, d in planned if (d / "report.json").exists()]

    fit_names = {n for n, _ in LAYOUTS[: args.calibrate_on]}
    fit = [(n, p) for n, p in reports if n in fit_names]
    held = [(n, p) for n, p in reports if n not in fit_names]
    if not fit or not held:
        print(f"need runs both to fit ({len(fit)}) and to hold out ({len(held)})", file=sys.stderr)
        return 1
    calibrated = out / "calibrated.yaml"
    r = kdplan("calibrate", *[p for _, p in fit], "--cluster", profile, "-o", calibrated)
    print(r.stdout.strip())
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1

    cal = load_cluster(str(calibrated))
    print(f"\n{'run':<16}{'set':<10}{'measured s':>12}{'before s':>10}{'after s':>10}{'err before':>12}"
          f"{'err after':>11}{'mem GiB':>9}{'pred GiB':>9}{'mem err':>9}  repeats s")
    errs: dict[str, list[float]] = {"before": [], "after": [], "mem": []}
    for name, path in fit + held:
        case = load_case(str(path))
        before = json.loads(path.read_text())["predicted"]["step_time_s"]
        after, mem = predict(case, cal)
        eb, ea = rel_err(before, case.measured_step_s), rel_err(after, case.measured_step_s)
        em = rel_err(mem, case.measured_memory_gib)
        held_out = name not in fit_names
        if held_out:
            errs["before"].append(eb)
            errs["after"].append(ea)
            errs["mem"].append(em)
        print(f"{name:<16}{'held-out' if held_out else 'fit':<10}{case.measured_step_s:>12.4f}{before:>10.4f}"
              f"{after:>10.4f}{eb:>12.1%}{ea:>11.1%}{case.measured_memory_gib:>9.3f}{mem:>9.3f}{em:>9.1%}  "
              + " ".join(f"{x:.3f}" for x in runs.get(name, [])))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    print(f"\n{len(fit)} runs calibrated on, {len(held)} held out; loop took {time.time() - t0:.0f} s; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores shared: noise)")
    print(f"calibration divided the held-out step-time error by {mean['before'] / max(mean['after'], 1e-9):.1f}")
    print(f"held-out step-time error: before {mean['before']:.1%}, after {mean['after']:.1%}; "
          f"peak-memory error: {mean['mem']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
