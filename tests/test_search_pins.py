"""Pins are never pruned (issue 13 item 1): a pinned value valid for the model and batch is
priced, whatever caps bound the solver's own exploration; the solver's micro-batch search covers
every divisor of the per-replica batch within its token cap, not only powers of two up to 16."""

import pytest

from kdplan.jobs import JobSpec, resolve
from kdplan.models import preset
from kdplan.planner import make_plan
from kdplan.search import candidates as cand

SMALL = dict(teacher=None, student="llama-3.2-1b", cluster="dgx-a100-80g", gpus=8, seq_len=512)


@pytest.mark.parametrize("mb", [18, 20, 24, 40, 48, 64, 128])
def test_pinned_micro_batch_above_16_or_not_a_power_of_two_is_planned(mb):
    # Published FSDP runs use these (fms-fsdp, InternEvo); before, every one was refused as
    # "no valid student layout satisfies --fix student.micro_batch=...".
    p = resolve(JobSpec(**SMALL, global_batch=mb * 8 * 2), pins=[f"student.micro_batch={mb}", "student.dp=8"])
    plan = make_plan(p)
    assert plan.student.layout.micro_batch == mb
    assert plan.prediction.step_time_s > 0


def test_pinned_micro_batch_plans_through_the_cli(kdplan_cli):
    r = kdplan_cli("plan", "--teacher", "none", "--student", "llama-3.2-1b", "--cluster", "dgx-a100-80g",
                   "--gpus", "8", "--seq-len", "512", "--global-batch", "768", "--fix", "student.micro_batch=48",
                   "--fix", "student.dp=8", "--json")
    assert r.returncode == 0, r.stderr
    assert '"micro_batch": 48' in r.stdout


def test_pins_bypass_the_exploration_caps():
    # far above the token cap at sequence 8192 (64K tokens = 8 sequences): explored only when pinned
    assert cand.micro_batches(256, seq_len=8192) == [1, 2, 4, 8, 16]
    assert cand.micro_batches(256, seq_len=8192, pinned=128) == [128]
    assert cand.micro_batches(256, seq_len=8192, pinned=48) == []  # does not divide: invalid
    # every divisor within the cap, not only powers of two
    assert cand.micro_batches(144, seq_len=1024) == [1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 36, 48]
    m = preset("gpt-1.3b")
    # tp=16 crosses the 8-GPU node: never explored, but valid (16 heads) and honoured when pinned
    free = cand.role_options(m, "student", 16, gpus_per_node=8, global_batch=64, memory_gib=80.0, pins={})
    assert free and all(o.layout.tp <= 8 for o in free)
    pinned = cand.role_options(m, "student", 16, gpus_per_node=8, global_batch=64, memory_gib=80.0,
                               pins={"student.tp": 16})
    assert pinned and all(o.layout.tp == 16 for o in pinned)


def test_activation_floor_bounds_the_explored_micro_batches():
    m = preset("llama-3.2-1b")
    opts = cand.role_options(m, "student", 1, gpus_per_node=8, global_batch=128, memory_gib=80.0, pins={},
                             seq_len=512)
    mbs = {o.layout.micro_batch for o in opts}
    assert max(mbs) > 16 and 24 not in mbs  # 24 does not divide 128
    # each kept layout's states + activation floor fit; the first dropped micro-batch does not
    for o in opts:
        lo = o.layout
        floor = cand.activation_bytes_lower_bound(m, "student", tp=lo.tp, pp=lo.pp, micro_batch=lo.micro_batch,
                                                  seq_len=512) + cand.state_bytes_lower_bound(m, lo, "student")
        assert floor <= 80 * 2**30


def test_small_student_best_layout_may_use_a_micro_batch_above_16():
    # Regression of the planner's own output (a prediction, not a measurement): with 64
    # sequences of 1,024 tokens per replica, the 1B student's fastest layout runs mb 32; under
    # the old cap (16) it could not be reached.
    plan = make_plan(resolve(JobSpec(**{**SMALL, "seq_len": 1024}, global_batch=1024)))
    assert plan.student.layout.micro_batch > 16
