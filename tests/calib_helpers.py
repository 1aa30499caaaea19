"""Synthetic plans and run reports for the calibration tests: priced by the real cost model."""

from __future__ import annotations

from kdplan.cost import Candidate, evaluate
from kdplan.problem import Problem
from kdplan.schema.compression import parse_compression
from kdplan.schema.job import JobSpec
from kdplan.schema.model import ModelSpec
from kdplan.schema.plan import JobSummary, KDPlan, Layout, Plan, RolePlan
from kdplan.schema.report import Measured, PlanRef, RunReport

TEACHER = ModelSpec(name="tiny-teacher", num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4,
                    ffn_hidden_size=704, vocab_size=8192, max_positions=512)
STUDENT = ModelSpec(name="tiny-student", num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=2,
                    ffn_hidden_size=352, vocab_size=8192, max_positions=512)

LAYOUTS = [  # (student tp, pp, dp, micro_batch), (teacher tp, pp, dp) -- all on 2 processes
    ((1, 1, 2, 4), (1, 1, 2)),
    ((2, 1, 1, 8), (2, 1, 1)),
    ((1, 2, 1, 2), (1, 2, 1)),
    ((1, 1, 2, 2), (2, 1, 1)),
    ((1, 1, 2, 8), (1, 1, 2)),
]


def layout(tp: int, pp: int, dp: int, mb: int = 1) -> Layout:
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch=mb, num_gpus=tp * pp * dp)


def problem(cluster, *, seq_len: int = 128, global_batch: int = 16) -> Problem:
    job = JobSpec(teacher="tiny-teacher", student="tiny-student", cluster=cluster.name, gpus=2, seq_len=seq_len,
                  global_batch=global_batch, precision="fp32")
    return Problem(job=job, teacher=TEACHER, student=STUDENT, cluster=cluster)


def make_plan(cluster, student: tuple, teacher: tuple, compression: str = "dense") -> Plan:
    p = problem(cluster)
    cand = Candidate(student=layout(*student), teacher=layout(*teacher), compression=parse_compression(compression))
    pred = evaluate(p, cand, with_baselines=False)
    return Plan(job=JobSummary(cluster=cluster.name, gpus=2, gpus_per_node=cluster.groups[0].node.gpus_per_node,
                               device_kind="cpu", seq_len=p.job.seq_len, global_batch=p.job.global_batch,
                               precision="fp32"),
                teacher=RolePlan(source="tiny-teacher", model=TEACHER, layout=cand.teacher),
                student=RolePlan(source="tiny-student", model=STUDENT, layout=cand.student),
                kd=KDPlan(compression=compression), prediction=pred, world_size=2)


def write_case(tmp, i: int, plan: Plan, step_s: float, memory_gib: float):
    """A plan file and a report that says the run took ``step_s`` and peaked at ``memory_gib``."""
    pp = tmp / f"plan{i}.json"
    pp.write_text(plan.model_dump_json())
    rep = RunReport(plan=PlanRef(path=pp.name, sha256="0" * 64), world_size=2, device="cpu", steps=10,
                    measured=Measured(step_time_s=step_s, tokens_per_s=1.0, utilization=0.5,
                                      peak_memory_gib=memory_gib),
                    predicted=plan.prediction)
    rp = tmp / f"report{i}.json"
    rp.write_text(rep.model_dump_json())
    return rp
