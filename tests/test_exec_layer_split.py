"""The executor's stage ranges for a layout without stages are the planner's split
(kdplan.schema.layers), so a hand-written plan runs the split the cost model priced."""

from executor.pipeline import stage_layer_ranges
from kdplan.schema import Layout
from kdplan.schema.layers import layer_ranges, split_layers
from kdplan.search.decode import finalize_layout


def test_executor_ranges_equal_the_planned_stages():
    for layers, pp, v in [(28, 3, 1), (70, 12, 1), (24, 4, 2), (10, 4, 1)]:
        lo = Layout(tp=1, pp=pp, dp=1, micro_batch=1, virtual_stages=v, num_gpus=pp,
                    schedule="interleaved_1f1b" if v > 1 else "1f1b")
        planned = finalize_layout(lo, layers, 0, None, lambda r: "a100-80g")
        want = [(s.first_layer, s.last_layer) for s in planned.stages]
        assert stage_layer_ranges(lo, layers) == want == layer_ranges(split_layers(layers, pp * v))
