"""Candidate enumeration: every emitted layout is valid; pins filter; mixed-cluster layer split."""

import pytest

from kdplan.errors import Infeasible
from kdplan.jobs import JobSpec, resolve
from kdplan.models import preset
from kdplan.schema.compression import Compression
from kdplan.search import candidates as cand
from kdplan.search.mixed import balance_layers, stage_groups
from kdplan.search.candidates import arrangements, splits
from kdplan.search.space import dominant


@pytest.mark.parametrize("name,role,gpus,gpn,batch", [
    ("gpt-1.3b", "student", 32, 8, 512), ("llama-3-8b", "student", 16, 8, 64),
    ("llama-3-70b", "teacher", 64, 8, 256), ("qwen2.5-7b", "student", 8, 8, 24),
    ("gpt-13b", "teacher", 12, 4, 48),
])
def test_every_layout_is_valid(name, role, gpus, gpn, batch):
    m = preset(name)
    opts = cand.role_options(m, role, gpus, gpus_per_node=gpn, global_batch=batch, memory_gib=80.0, pins={})
    assert opts
    for o in opts:
        lo = o.layout
        assert lo.tp * lo.pp * lo.dp == gpus == lo.num_gpus
        assert m.num_heads % lo.tp == 0 and m.num_kv_heads % lo.tp == 0 and lo.tp <= gpn
        assert batch % lo.dp == 0 and (batch // lo.dp) % lo.micro_batch == 0
        assert lo.sequence_parallel is False or lo.tp > 1
        assert lo.pp <= m.num_layers
        if o.stage_layers:
            assert sum(o.stage_layers) == m.num_layers and len(o.stage_layers) == lo.pp
            assert min(o.stage_layers) >= 1
        else:
            assert m.num_layers % (lo.pp * lo.virtual_stages) == 0
        if lo.virtual_stages > 1:
            assert lo.pp > 1 and (batch // lo.dp // lo.micro_batch) % lo.pp == 0
        if lo.dp == 1:
            assert lo.zero == 0 and lo.grad_compression == "none"
        if role == "teacher":  # forward only: no gradients, optimizer or recomputation
            assert lo.zero in (0, 3) and lo.recompute == "none" and lo.offload in ("none", "weights")
            assert lo.grad_compression == "none"
        else:
            assert lo.offload in ("none", "optimizer")
    keys = [o.key() for o in opts]
    assert len(keys) == len(set(keys))


def test_memory_floor_drops_layouts_that_cannot_fit():
    m = preset("llama-3-70b")
    # 70B of bf16 weights is 131 GiB: one GPU of 80 GiB cannot hold it without offload.
    opts = cand.role_options(m, "teacher", 1, gpus_per_node=8, global_batch=8, memory_gib=80.0, pins={})
    assert opts and all(o.layout.offload == "weights" for o in opts)


def test_pins_filter_and_name_themselves():
    m = preset("gpt-1.3b")
    pins = {"student.tp": 2, "student.recompute": "full", "student.micro_batch": 4}
    opts = cand.role_options(m, "student", 8, gpus_per_node=8, global_batch=64, memory_gib=80.0, pins=pins)
    assert opts and all(o.layout.tp == 2 and o.layout.recompute == "full" and o.layout.micro_batch == 4 for o in opts)
    # A pin that no valid layout satisfies (tp=3 does not divide 16 heads) is named.
    p = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=8, global_batch=64),
                pins=["student.tp=3"])
    from kdplan.planner import make_plan
    with pytest.raises(Infeasible, match="student.tp=3"):
        make_plan(p)


def test_compressions_respect_floor_allowed_and_pin():
    p = resolve(JobSpec(kd={"min_topk": 64}), pins=[])
    cs = cand.compressions(p)
    assert all(c.kind == "dense" or c.k >= 64 for c in cs) and Compression("dense") in cs
    p = resolve(JobSpec(kd={"allowed_compressions": ["topk:32:8", "dense"]}))
    assert [str(c) for c in cand.compressions(p)] == ["topk:32:8", "dense"]
    p = resolve(JobSpec(), pins=["kd.compression=topk:128:4"])
    assert [str(c) for c in cand.compressions(p)] == ["topk:128:4"]


def test_dominance_keeps_smallest_payload():
    cs = [Compression("dense"), Compression("topk", 64, 16), Compression("topk", 64, 8), Compression("topk", 256, 4)]
    kept = dominant(cs, 50257)
    assert Compression("topk", 64, 8) in kept and Compression("topk", 64, 16) not in kept
    # Only the same kind is compared: top-k pays a selection pass, dense a loss over the vocabulary.
    assert Compression("dense") in kept and Compression("topk", 256, 4) not in kept


def test_arrangements_follow_pins():
    p = resolve(JobSpec(gpus=32))
    kinds = {(a.mode, a.placement) for a in arrangements(p)}
    assert ("online", "colocated") in kinds and ("online", "disaggregated") in kinds
    assert all(a.teacher_gpus + a.student_gpus == 32 for a in arrangements(p) if a.placement == "disaggregated")
    p = resolve(JobSpec(gpus=32), pins=["kd.placement=disaggregated"])
    assert {a.placement for a in arrangements(p)} == {"disaggregated"}
    p = resolve(JobSpec(gpus=32), pins=["kd.mode=offline"])
    assert {a.mode for a in arrangements(p)} == {"offline"}
    assert splits(16384, 8) and len(splits(16384, 8)) <= 50


def _min_slowest_stage(L, times):
    """Exact by dynamic programming over (stages used, layers placed): an independent check
    (enumerating every split took 280 s for 80 layers on 5 stages)."""
    best = {0: 0.0}  # layers placed so far -> least slowest stage among them
    for t in times:  # each stage takes at least one layer
        best = {m: min(max(v, (m - n) * t) for n, v in best.items() if n < m) for m in range(min(best) + 1, L + 1)}
    return best[L]


def test_balance_layers_is_optimal():
    for L, times in [(24, [1.0, 1.0, 0.5, 0.5]), (32, [1.0, 0.4]), (80, [1.0, 1.0, 0.6, 0.6, 0.6]), (7, [1, 2, 3])]:
        best = balance_layers(L, times)
        assert sum(best) == L and min(best) >= 1
        slowest = max(l * t for l, t in zip(best, times))
        assert slowest == pytest.approx(_min_slowest_stage(L, times))
    assert stage_groups([16, 16], 8) == (0, 0, 1, 1) and stage_groups([16, 16], 12) is None


def test_balance_layers_with_fixed_work_on_a_stage():
    # the output projection on the last stage is worth ~2.5 layers: that stage takes fewer layers
    for L, times, extra in [(32, [1.0, 1.0], [0.0, 2.5]), (80, [1.0, 0.6, 0.6], [0.0, 0.0, 1.5]),
                            (24, [1.0, 1.0, 0.5, 0.5], [0.3, 0.0, 0.0, 1.2])]:
        best = balance_layers(L, times, extra=extra)
        assert sum(best) == L and min(best) >= 1
        slowest = max(l * t + e for l, t, e in zip(best, times, extra))
        best_dp = {0: 0.0}  # exact: layers placed so far -> least slowest stage among them
        for t, e in zip(times, extra):
            best_dp = {m: min(max(v, (m - n) * t + e) for n, v in best_dp.items() if n < m)
                       for m in range(min(best_dp) + 1, L + 1)}
        assert slowest == pytest.approx(best_dp[L])
        # never worse than the split that ignores the fixed work
        plain = balance_layers(L, times)
        assert slowest <= max(l * t + e for l, t, e in zip(plain, times, extra)) + 1e-9
    assert balance_layers(32, [1.0, 1.0], extra=[0.0, 2.5]) == (17, 15)
