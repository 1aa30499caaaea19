"""kdplan's plan against mirror KD (the teacher co-located on the student's own tp/pp layout,
as Megatron/NeMo ModelOpt distillation runs it), predicted by the same cost model.

    python benchmarks/vs_mirror.py

Target (issue 4 item 8): >= 1.3x where the teacher is at least 4x the student; never worse.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from kdplan.errors import Infeasible  # noqa: E402
from kdplan.jobs import JobSpec, resolve  # noqa: E402
from kdplan.planner import make_plan  # noqa: E402
from kdplan.search.decode import layout_summary  # noqa: E402

PAIRS = [("llama-3-70b", "llama-3-8b", "dgx-h100", 4096), ("qwen2.5-72b", "qwen2.5-7b", "dgx-h100", 4096),
         ("gpt-13b", "gpt-1.3b", "dgx-a100-80g", 2048)]
SHAPES = [(8, 64), (32, 256)]  # (GPUs, global batch in sequences): one 8-GPU node, four nodes


def main() -> None:
    print(f"{'teacher -> student':28} {'ratio':>6} {'GPUs':>5} {'mirror':>10} {'kdplan':>10} {'speedup':>8}  plan")
    for teacher, student, cluster, seq in PAIRS:
        for gpus, batch in SHAPES:
            p = resolve(JobSpec(teacher=teacher, student=student, cluster=cluster, gpus=gpus, seq_len=seq,
                                global_batch=batch))
            ratio = p.teacher.num_params() / p.student.num_params()
            try:
                plan = make_plan(p, top_k=0)
            except Infeasible as e:
                print(f"{teacher + ' -> ' + student:28} {ratio:5.1f}x {gpus:>5}  infeasible: {e}")
                continue
            pr = plan.prediction
            m = pr.baselines.mirror.step_time_s
            sp = f"{m / pr.step_time_s:7.2f}x" if m else "   (n/a)"
            target = "" if m is None else ("  below 1.3x" if ratio >= 4 and m / pr.step_time_s < 1.3 else "")
            print(f"{teacher + ' -> ' + student:28} {ratio:5.1f}x {gpus:>5} "
                  f"{(f'{m:8.2f} s') if m else 'cannot run':>10} {pr.step_time_s:8.2f} s {sp}  "
                  f"{plan.kd.placement} {plan.kd.compression}; T {layout_summary(plan.teacher.layout)}; "
                  f"S {layout_summary(plan.student.layout)}{target}", flush=True)
            if not m:
                print(f"{'':28} mirror cannot run: {pr.baselines.mirror.reason}")


if __name__ == "__main__":
    main()
