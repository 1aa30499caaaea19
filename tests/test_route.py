"""The one routing rule of the teacher's targets (kdplan.schema.capability.target_route): which teacher
dp group serves each student dp shard, which rank sends its targets and which ranks receive them.

The executor reads it (executor.teacher.Targets.route, executor.mesh.p2p_pairs) and so does the
capability table (uneven_teacher_groups); there is no second copy to agree with. Checked here, on
every layout pair of a sweep, co-located and disaggregated, against the rank grid built
independently (a nested [pp][dp][tp] list of each role's ranks):

- the receivers of shard d are the student's last-stage ranks of dp index d (all their tp ranks);
- the sender is a rank of the serving group's last teacher stage;
- co-located, the serving group holds a receiver whenever one is a teacher rank, and the sender is
  a receiver whenever the group's last stage has one (nothing crosses a link): a mirror layout
  sends nothing at all;
- otherwise shard d goes to group d * teacher dp // student dp (contiguous blocks);
- hand-made cases with the answers written out, uneven groups included. Torch-free.
"""

import itertools

from exec_helpers import layout, make_plan

from kdplan.schema.capability import role_ranks, target_route, teacher_group_of_shard, uneven_teacher_groups


def grid(ranks: list[int], lay) -> list[list[list[int]]]:
    it = iter(ranks)
    return [[[next(it) for _ in range(lay.tp)] for _ in range(lay.dp)] for _ in range(lay.pp)]


def shapes():
    return [(tp, pp, dp) for tp, pp, dp in itertools.product((1, 2), (1, 2), (1, 2,3, 4, 6)) if tp * pp * dp <= 12]


def test_the_rule_on_every_layout_pair(tmp_path):
    checked = seen_uneven = seen_remote = 0
    for (st, sp, sd), (tt, tpp, td) in itertools.product(shapes(), shapes()):
        for placement in ("colocated", "disaggregated"):
            if placement == "colocated" and st * sp * sd != tt * tpp * td:
                continue
            plan = make_plan(tmp_path, layout(tp=st, pp=sp, dp=sd), layout(tp=tt, pp=tpp, dp=td), placement=placement)
            tr, sr = role_ranks(plan)
            T, S = grid(tr, plan.teacher.layout), grid(sr, plan.student.layout)
            route = target_route(plan)
            case = (placement, (st, sp, sd), (tt, tpp, td))
            assert sorted(route.group_of_shard) == list(range(sd)), case
            for d in range(sd):
                g = route.group_of_shard[d]
                assert 0 <= g < td, case
                assert route.receivers[d] == S[-1][d], case
                assert route.sender[d] in T[-1][g], case
                group_ranks = {r for stage in T for r in stage[g]}
                teachers_among_receivers = [r for r in S[-1][d] if r in tr]
                if teachers_among_receivers:
                    assert teachers_among_receivers[0] in group_ranks, case
                else:
                    assert g == d * td // sd, case
                if set(T[-1][g]) & set(S[-1][d]):
                    assert route.sender[d] in route.receivers[d], case  # kept locally
                else:
                    seen_remote += 1
                assert d in route.shards_of_group(g)
            assert teacher_group_of_shard(plan) == route.group_of_shard
            if placement == "colocated" and (st, sp, sd) == (tt, tpp, td):  # the mirror layout
                assert all(route.sender[d] in route.receivers[d] for d in range(sd)), case
            seen_uneven += uneven_teacher_groups(plan) is not None
            checked += 1
    assert checked > 50 and seen_uneven > 0 and seen_remote > 0  # the sweep reaches every branch


def test_hand_made_routes(tmp_path):
    # disaggregated: student dp 4 on ranks 2-5, teacher dp 2 on ranks 0-1: shards in blocks of two
    plan = make_plan(tmp_path, layout(dp=4, ranks=[2, 3, 4, 5]), layout(dp=2, ranks=[0, 1]), placement="disaggregated")
    r = target_route(plan)
    assert r.group_of_shard == {0: 0, 1: 0, 2: 1, 3: 1}
    assert r.sender == {0: 0, 1: 0, 2: 1, 3: 1}
    assert r.receivers == {0: [2], 1: [3], 2: [4], 3: [5]}
    assert r.shards_of_group(1) == [2, 3] and uneven_teacher_groups(plan) is None

    # co-located: student tp 2 x dp 2 on ranks 0-3, teacher dp 4: shard 0's receivers 0, 1 hold
    # teacher groups 0 and 1 (group 0 serves it, rank 0 sends to itself and to rank 1); shard 1's
    # receivers 2, 3 hold groups 2 and 3 (group 2). Groups 1 and 3 serve nothing: uneven.
    plan = make_plan(tmp_path, layout(tp=2, dp=2), layout(dp=4))
    r = target_route(plan)
    assert r.group_of_shard == {0: 0, 1: 2}
    assert r.sender == {0: 0, 1: 2}
    assert r.receivers == {0: [0, 1], 1: [2, 3]}
    assert uneven_teacher_groups(plan) == [0, 1]

    # co-located, student pp 2 x dp 2 (last stage: ranks 2, 3), teacher tp 2 x dp 2 (group 1 = ranks
    # 2, 3): both shards' receivers sit in teacher group 1, whose tp rank matching each receiver sends
    plan = make_plan(tmp_path, layout(pp=2, dp=2), layout(tp=2, dp=2))
    r = target_route(plan)
    assert r.group_of_shard == {0: 1, 1: 1}
    assert r.sender == {0: 2, 1: 3}
    assert r.receivers == {0: [2], 1: [3]}
    assert uneven_teacher_groups(plan) == [0, 2]
