"""Which teacher group serves which student shard, and who sends and receives its targets
(torch-free: executor.launch checks a plan with it before any process group exists).

The global batch of a step is split into ``dp_s`` student shards; shard ``d`` is served by one
teacher dp group (its tp x pp ranks), and its targets go to the ranks of the student's last
pipeline stage with dp index ``d`` (all their tp ranks). One rank of the teacher group's last
stage sends; a receiver that is that rank keeps its copy locally (nothing crosses a link).
"""

from __future__ import annotations

from dataclasses import dataclass

from .mesh import RoleMesh


@dataclass(frozen=True)
class Route:
    group_of_shard: dict[int, int]  # student shard -> teacher dp index serving it
    sender: dict[int, int]  # student shard -> global rank that delivers its targets
    receivers: dict[int, list[int]]  # student shard -> global ranks that need them

    def shards_of_group(self, g: int) -> list[int]:
        return sorted(d for d, x in self.group_of_shard.items() if x == g)


def make_route(tmesh: RoleMesh, smesh: RoleMesh) -> Route:
    group, sender, receivers = {}, {}, {}
    for d in range(smesh.dp):
        recv = [smesh.rank_at(smesh.pp - 1, d, t) for t in range(smesh.tp)]
        # Prefer the teacher group a receiver sits in (co-located: no link crossed).
        mine = [r for r in recv if r in tmesh.ranks]
        g = tmesh.coord(mine[0])[1] if mine else d * tmesh.dp // smesh.dp
        last = [tmesh.rank_at(tmesh.pp - 1, g, t) for t in range(tmesh.tp)]
        local = [r for r in last if r in recv]
        group[d], sender[d], receivers[d] = g, (local[0] if local else last[0]), recv
    return Route(group, sender, receivers)
