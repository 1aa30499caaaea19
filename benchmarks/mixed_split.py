"""Mixed cluster: layers per pipeline stage balanced to GPU speed vs an even split.

    python benchmarks/mixed_split.py

examples/mixed/job.toml (llama-3-8b -> llama-3.2-1b on 16 A100-80GB + 16 H100) planned three
ways with the student's pipeline spanning both GPU types: the even layer split, the
speed-balanced split (kdplan.search.mixed.balance_layers), the split that also counts the last
stage's output projection and loss, the split kdplan chose (the ILP prices all three), and
kdplan's free choice.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from kdplan.jobs import load_job, resolve  # noqa: E402
from kdplan.planner import Planner  # noqa: E402
from kdplan.search.decode import layout_summary  # noqa: E402

JOB = str(Path(__file__).resolve().parent.parent / "examples" / "mixed" / "job.toml")
PINS = ["kd.placement=colocated", "student.tp=8", "student.pp=2"]


def main() -> None:
    p = resolve(load_job(JOB), job_path=JOB, pins=PINS)
    space, blocks, sol = Planner().search(p, top_k=0)
    spanning = [b for b in blocks if len(b.arrangement.student_groups) > 1]
    print(f"{p.teacher.name} -> {p.student.name} on {p.num_gpus} GPUs "
          f"({', '.join(f'{g.num_nodes * g.node.gpus_per_node} {g.node.gpu}' for g in p.cluster.groups)}), pins {PINS}")
    from kdplan import cost
    from kdplan.schema.layers import split_layers
    from kdplan.search.mixed import (balance_layers, balance_layers_with_head, output_projection_layers,
                                     relative_layer_time)
    b = min(spanning, key=lambda b: min(v[0] for v in b.combos.values()))
    (i, j), _ = min(b.combos.items(), key=lambda kv: kv[1][0])
    teacher, so = b.teacher[i], b.student[j].option
    ts = [relative_layer_time(p.cluster, p.job.precision)[g] for g in so.stage_groups]
    L, s = p.student.num_layers, p.job.seq_len
    head = output_projection_layers(p.student, s)
    splits = {"even": split_layers(L, so.layout.pp), "speed-balanced": balance_layers(L, ts),
              "head-aware": balance_layers_with_head(L, ts, p.student, s),
              "chosen": so.stage_layers}
    print(f"  per-layer time by stage (fastest = 1): {', '.join(f'{t:.2f}' for t in ts)}; "
          f"output projection = {head:.1f} layers on the last stage")
    steps = {}
    for name, split in splits.items():
        c = space.candidate(b.arrangement, b.compression, teacher, type(b.student[j])(so.__class__(so.layout, split, so.stage_groups), 0, 0))
        steps[name] = cost.compose(p, c)[0]
        groups = "/".join(p.cluster.groups[g].node.gpu for g in so.stage_groups)
        print(f"  {name:15} layers per stage {'/'.join(map(str, split)):>6} on {groups}: step {steps[name]:6.3f} s "
              f"(student {layout_summary(so.layout)}; teacher {layout_summary(teacher.option.layout)})")
    print(f"  gain over the even split: speed-balanced {steps['even'] / steps['speed-balanced']:.2f}x, "
          f"head-aware {steps['even'] / steps['head-aware']:.2f}x, chosen {steps['even'] / steps['chosen']:.2f}x")
    plan = Planner().plan(resolve(load_job(JOB), job_path=JOB), top_k=0)
    st = plan.student.layout
    print(f"kdplan free choice: {plan.kd.placement}, step {plan.prediction.step_time_s:.3f} s; student "
          f"{layout_summary(st)}, layers/stage {'/'.join(str(s.last_layer - s.first_layer) for s in st.stages)} "
          f"on {'/'.join(s.gpu or '-' for s in st.stages)}")


if __name__ == "__main__":
    main()
