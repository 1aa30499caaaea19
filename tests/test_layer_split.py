"""One layer split (kdplan.schema.layers.split_layers) for the planner's uneven candidates, the
plan's stages, the cost model's default and the executor's fallback: a second remainder rule
(there were three) makes the executor run a split the cost model did not price."""

import pytest

from kdplan.cost import price_student
from kdplan.jobs import JobSpec, resolve
from kdplan.models import preset
from kdplan.schema.compression import Compression
from kdplan.schema.layers import layer_ranges, split_layers
from kdplan.search import candidates as cand
from kdplan.search.decode import finalize_layout


@pytest.mark.parametrize("layers,stages", [(70, 12), (28, 3), (24, 5), (32, 3), (16, 16), (7, 2), (9, 1), (40, 8)])
def test_split_is_even_with_the_first_and_last_stages_never_heavier(layers, stages):
    counts = split_layers(layers, stages)
    assert len(counts) == stages and sum(counts) == layers
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    if stages > 2 and layers % stages <= stages - 2:  # the remainder fits in the middle stages
        assert counts[0] == counts[-1] == min(counts)


def test_bloom_split_and_ranges():
    assert split_layers(70, 12) == (5,) + (6,) * 10 + (5,)
    assert layer_ranges((5, 6, 5)) == [(0, 5), (5, 11), (11, 16)]
    with pytest.raises(ValueError):
        split_layers(4, 5)


def test_uneven_candidate_and_plan_stages_follow_the_one_rule():
    m = preset("qwen2.5-7b")  # 28 layers: pp=3 is uneven
    opts = cand.role_options(m, "student", 24, gpus_per_node=8, global_batch=48, memory_gib=80.0,
                             pins={"student.pp": 3})
    assert opts and {o.stage_layers for o in opts} == {split_layers(28, 3)} == {(9, 10, 9)}
    lo = opts[0].layout
    staged = finalize_layout(lo, m.num_layers, 0, None, lambda r: "a100-80g")
    assert [(s.first_layer, s.last_layer) for s in staged.stages] == layer_ranges(split_layers(28, 3))


def test_cost_model_default_is_the_same_split():
    p = resolve(JobSpec(teacher=None, student="qwen2.5-7b", cluster="dgx-a100-80g", gpus=24, seq_len=2048,
                        global_batch=48))
    opt = cand.role_options(p.student, "student", 24, gpus_per_node=8, global_batch=48, memory_gib=80.0,
                            pins={"student.pp": 3, "student.tp": 4, "student.micro_batch": 1})[0]
    given = price_student(p, opt.layout, compression=Compression("dense"), stage_layers=opt.stage_layers)
    default = price_student(p, opt.layout, compression=Compression("dense"))
    assert [x.memory_gib for x in default.stages] == [x.memory_gib for x in given.stages]
    assert default.time_s == given.time_s
