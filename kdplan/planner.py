"""The planner: Problem -> Plan (candidates -> prices -> ILP -> simulator check -> plan).

Filled by the solver (kdplan/search) and cost model (kdplan/cost); until they land,
``make_plan`` says so.
"""

from __future__ import annotations

from .errors import NotImplementedYet
from .jobs import Problem
from .schema import Plan


def make_plan(problem: Problem) -> Plan:
    raise NotImplementedYet("the solver has not landed yet")
