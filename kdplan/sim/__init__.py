"""The step simulator: an event simulation of one training step of a plan.

- ``simulate_step(StudentInput, TeacherInput | None) -> SimResult``: plain inputs (times per
  pipeline stage and micro-batch, schedule, collectives, teacher stream); see ``step``.
- ``simulate_plan(plan) -> PlanSimulation``: prices a plan with the cost model and simulates it,
  with the closed form alongside; ``write_trace(plan, path)`` also writes its Chrome/Perfetto
  trace (``kdplan simulate --trace``; ``kdplan whatif --trace-dir`` calls it per point).
- ``chrome_trace(result)``: the trace-event JSON of a ``SimResult``.

One data-parallel replica per role is simulated: all replicas run the same schedule on the same
kind of GPUs, so each track stands for the tp x dp GPUs of one pipeline rank.
"""

from .plan_sim import PlanSimulation, load_plan, problem_from_plan, simulate_plan, write_trace
from .step import SimResult, StudentInput, TeacherInput, simulate_step
from .trace import chrome_trace, trace_json

__all__ = ["simulate_step", "StudentInput", "TeacherInput", "SimResult", "simulate_plan", "PlanSimulation",
           "write_trace", "load_plan", "problem_from_plan", "chrome_trace", "trace_json"]
