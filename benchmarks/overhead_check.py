"""Does an uncalibrated profile predict the tiny CPU plan? One script, one machine state.

    python benchmarks/overhead_check.py [--profile PROFILE.yaml] [--steps 20] [--out runs/overhead-check]

1. `kdplan profile --quick --base cpu-local` measures this machine (or --profile takes one);
2. `kdplan plan examples/tiny-cpu/job.toml --cluster PROFILE` plans the tiny example on it;
3. `kdplan run PLAN --steps N` runs it (2 gloo processes);
4. the run's exact layout is priced again with the profile as measured and with its framework
   overheads zeroed (Overheads.framework and layer_overhead_s: the cost model before issue 13
   item 5), the baseline measured in the same script at the same load.

Last line: ``tiny plan: measured X s/step; predicted Y (E%), without framework overheads Z (F%);
load L``. The load average is printed because on 2 shared cores it moves every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdplan.calibrate.calibrate import load_case, predict, rel_err  # noqa: E402
from kdplan.profiles import load_cluster  # noqa: E402
from kdplan.schema.cluster import FrameworkOverheads  # noqa: E402

JOB = ROOT / "examples" / "tiny-cpu" / "job.toml"


def kdplan(*args, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    print("$ kdplan " + " ".join(map(str, args)), flush=True)
    return subprocess.run([sys.executable, "-m", "kdplan.cli.main", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def without_framework(cluster):
    ov = cluster.overheads.model_copy(update={"framework": FrameworkOverheads(), "layer_overhead_s": 0.0})
    return cluster.model_copy(update={"overheads": ov})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", help="use this profile instead of measuring one (--quick)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "runs" / "overhead-check"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    profile = Path(args.profile) if args.profile else out / "profile.yaml"
    if not args.profile:
        t0 = time.time()
        r = kdplan("profile", "--quick", "--base", "cpu-local", "--models",
                   f"{JOB.parent / 'teacher' / 'config.json'},{JOB.parent / 'student' / 'config.json'}", "-o", profile)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        print(r.stdout.strip() + f"\n  ({time.time() - t0:.0f} s)")
    r = kdplan("plan", JOB, "--cluster", profile, "-o", out / "plan.json", "--top", "0")
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    r = kdplan("run", out / "plan.json", "--steps", args.steps, "--report", out / "report.json")
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
        return 1
    case = load_case(str(out / "report.json"))
    cl = load_cluster(str(profile))
    with_fw, _ = predict(case, cl)
    without, _ = predict(case, without_framework(cl))
    fw = cl.overheads.framework
    meas = case.measured_step_s
    steps = json.loads((out / "report.json").read_text())["measured"]["step_times_s"]
    print(f"framework terms: micro-batch {fw.micro_batch_s * 1e3:.2f} ms, forward micro-batch "
          f"{fw.forward_micro_batch_s * 1e3:.2f} ms, block {cl.overheads.layer_overhead_s * 1e3:.2f} ms, "
          f"TP block {fw.tp_block_s * 1e3:.2f} ms, FSDP unit {fw.fsdp_unit_s * 1e3:.2f} ms, "
          f"optimizer tensor {fw.optimizer_tensor_s * 1e6:.1f} us")
    print(f"step times s: fastest {min(steps):.3f}, median {sorted(steps)[len(steps) // 2]:.3f}")
    print(f"tiny plan: measured {meas:.3f} s/step; predicted {with_fw:.3f} ({(with_fw - meas) / meas:+.0%}, "
          f"|err| {rel_err(with_fw, meas):.0%}), without framework overheads {without:.3f} "
          f"({(without - meas) / meas:+.0%}); load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
