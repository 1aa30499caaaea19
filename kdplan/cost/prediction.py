"""A candidate's full prediction: its own (``compose.predict``) compared with the baselines.

Kept apart from compose.py because the baselines (kdplan.cost.baselines) are candidates priced
by compose.py: compose <- baselines <- prediction, no module importing back up.
"""

from __future__ import annotations

from ..problem import Problem
from ..schema.plan import Prediction
from .api import Candidate
from .baselines import baselines
from .compose import predict


def evaluate(problem: Problem, candidate: Candidate, *, with_baselines: bool = True) -> Prediction:
    """The full prediction block of design.md section 3 for one candidate.

    A candidate that cannot run at all (a role's layout is invalid: batch not divisible, tp not
    dividing the heads, ...) raises Infeasible with the reason. One that runs out of memory is
    still priced: its memory block shows the fullest GPU above its limit. ``with_baselines``
    adds the baselines (cached per problem) and the speedups over them.
    """
    pred = predict(problem, candidate)
    if with_baselines:
        b = baselines(problem)
        pred.baselines = b
        if b.single_gpu.step_time_s:
            pred.speedup_vs_single_gpu = b.single_gpu.step_time_s / pred.step_time_s
        if b.mirror.step_time_s:
            pred.speedup_vs_mirror = b.mirror.step_time_s / pred.step_time_s
        if b.naive_dp.comm_bytes_per_step:
            pred.comm_reduction_vs_naive_dp = 1 - pred.comm_bytes_per_step / b.naive_dp.comm_bytes_per_step
    return pred
