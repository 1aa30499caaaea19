"""The capability table's routing count (kdplan.schema.capability.teacher_group_of_shard, which the
planner needs to mark uneven teacher groups without importing the executor) is the executor's
route (executor/route.py make_route) on every layout pair of a sweep, co-located and disaggregated."""

import itertools

from exec_helpers import layout, make_plan

from executor.mesh import RoleMesh, role_ranks
from executor.route import make_route
from kdplan.schema.capability import teacher_group_of_shard, uneven_teacher_groups


def _executor_groups(plan):
    s, t = plan.student.layout, plan.teacher.layout
    tr, sr = role_ranks(plan)
    route = make_route(RoleMesh("teacher", tuple(tr), t.pp, t.dp, t.tp, None, -1),
                       RoleMesh("student", tuple(sr), s.pp, s.dp, s.tp, None, -1))
    return route.group_of_shard


def test_the_tables_routing_is_the_executors(tmp_path):
    shapes = [(tp, pp, dp) for tp, pp, dp in itertools.product((1, 2), (1, 2), (1, 2, 3, 4, 6)) if tp * pp * dp <= 12]
    seen_uneven = checked = 0
    for (st, sp, sd), (tt, tpp, td) in itertools.product(shapes, shapes):
        for placement in ("colocated", "disaggregated"):
            if placement == "colocated" and st * sp * sd != tt * tpp * td:
                continue
            plan = make_plan(tmp_path, layout(tp=st, pp=sp, dp=sd), layout(tp=tt, pp=tpp, dp=td), placement=placement)
            assert teacher_group_of_shard(plan) == _executor_groups(plan), (placement, (st, sp, sd), (tt, tpp, td))
            seen_uneven += uneven_teacher_groups(plan) is not None
            checked += 1
    assert checked > 50 and seen_uneven > 0  # the sweep reaches both answers
