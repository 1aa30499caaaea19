"""The ILP is exact: on problems small enough to enumerate, brute force over every candidate
combination (every compression, no pruning, the cost model's own composition) finds the same
optimum; pinning a key never beats the unpinned optimum."""

import pytest

from kdplan.errors import Infeasible
from kdplan.jobs import JobSpec, resolve
from kdplan.planner import Planner
from kdplan.search.bruteforce import brute_force, most_faithful
from kdplan.schema.compression import parse_compression
from kdplan.search.candidates import fidelity_key
from kdplan.search.choose import TIE_TOLERANCE

SCENARIOS = {
    "gpt-4gpu-3comp": dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=4, seq_len=1024,
                           global_batch=16, kd={"allowed_compressions": ["dense", "topk:64", "topk:64:8"]}),
    "gpt13b-40g": dict(teacher="gpt-13b", student="gpt-1.3b", cluster="dgx-a100-40g", gpus=4, seq_len=2048,
                       global_batch=8, kd={"allowed_compressions": ["dense", "topk:32:4"]}),
    "mixed-pinned": dict(teacher="llama-3-8b", student="llama-3.2-1b", cluster="mixed-a100-h100", gpus=16,
                         seq_len=2048, global_batch=32, kd={"allowed_compressions": ["topk:64:8"]},
                         fix={"student.zero": "1", "student.recompute": "none"}),
    "h100-pinned-tp": dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-h100", gpus=8, seq_len=1024,
                           global_batch=32, kd={"allowed_compressions": ["topk:16"]},
                           fix={"student.tp": "2", "student.micro_batch": "2"}),
    "no-teacher": dict(teacher=None, student="llama-3.2-1b", cluster="dgx-h100", gpus=8, seq_len=2048, global_batch=32),
    "offline-pinned": dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=4, seq_len=1024,
                           global_batch=16, kd={"allowed_compressions": ["topk:64:8", "topk:256"]},
                           fix={"kd.mode": "offline"}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_ilp_equals_brute_force(name):
    p = resolve(JobSpec(**SCENARIOS[name]))
    best, cand, tried = brute_force(p)
    assert cand is not None and tried > 500
    space, blocks, sol = Planner().search(p)
    assert sol.status == "optimal"
    assert sol.optimum == pytest.approx(best, rel=1e-9)
    # The tie-break may trade up to TIE_TOLERANCE of time for fidelity and fewer bytes, never more.
    chosen = blocks[sol.choices[0].block].step(sol.choices[0].teacher, sol.choices[0].student)
    assert best - 1e-12 <= chosen <= best * (1 + TIE_TOLERANCE) + 1e-12
    if p.teacher is not None:  # the same format as brute force's: the most faithful within tolerance
        assert blocks[sol.choices[0].block].compression == most_faithful(p)[1]


def test_chosen_plan_is_repriced_by_the_cost_model():
    p = resolve(JobSpec(**SCENARIOS["gpt-4gpu-3comp"]))
    plan = Planner().plan(p, top_k=2)
    space, blocks, sol = Planner().search(p)
    ch = sol.choices[0]
    assert plan.prediction.step_time_s == pytest.approx(blocks[ch.block].step(ch.teacher, ch.student), rel=1e-9)
    assert len(plan.alternatives) == 2
    assert all(a.step_time_s >= sol.optimum - 1e-12 for a in plan.alternatives)


def test_pinning_never_beats_the_unpinned_optimum():
    base = dict(SCENARIOS["gpt-4gpu-3comp"])
    free = Planner().search(resolve(JobSpec(**base)))[2].optimum
    for pin in ["student.tp=2", "student.pp=2", "student.zero=3", "student.recompute=full", "student.micro_batch=1",
                "teacher.tp=4", "teacher.offload=weights", "kd.placement=disaggregated", "kd.compression=dense"]:
        pinned = Planner().search(resolve(JobSpec(**base), pins=[pin]))[2].optimum
        assert pinned >= free - 1e-12, pin


def _pinned_optimum(spec, pins):
    try:
        return Planner().search(resolve(JobSpec(**spec), pins=pins))[2].optimum
    except Infeasible:  # that format does not fit at all
        return float("inf")


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_fidelity_is_only_traded_for_time(placement):
    """Never degrade the teacher signal unless it buys something: the chosen format is within the
    tie tolerance of the fastest plan, and every more faithful format (checked by pinning it) is
    beyond it. Co-located (outputs stay on the GPU) this keeps dense or the largest top-k; over
    InfiniBand (disaggregated) a smaller format is chosen only when it is faster."""
    spec = dict(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=16, seq_len=1024, global_batch=64,
                kd={"allowed_compressions": ["dense", "topk:1024", "topk:256:8", "topk:64", "topk:8:4"]})
    fix = [f"kd.placement={placement}"]
    space, blocks, sol = Planner().search(resolve(JobSpec(**spec), pins=fix))
    chosen = blocks[sol.choices[0].block].compression
    bound = sol.optimum * (1 + TIE_TOLERANCE) + 1e-12
    assert _pinned_optimum(spec, fix + [f"kd.compression={chosen}"]) <= bound
    for c in spec["kd"]["allowed_compressions"]:
        if fidelity_key(parse_compression(c)) > fidelity_key(chosen):
            assert _pinned_optimum(spec, fix + [f"kd.compression={c}"]) > bound, c
    assert str(chosen) in sol.compression_reason
    if placement == "colocated":  # nothing leaves the GPU: only the top-k selection / loss terms differ
        assert chosen.kind == "dense" or chosen.k == 1024


def test_fidelity_follows_min_topk_and_pins():
    spec = dict(SCENARIOS["gpt-4gpu-3comp"])
    space, blocks, sol = Planner().search(resolve(JobSpec(**spec), pins=["kd.compression=topk:64:8"]))
    assert str(blocks[sol.choices[0].block].compression) == "topk:64:8"
    assert "pinned" in sol.compression_reason


def test_priced_pair_without_a_layout_is_ignored():
    """Regression (fuzzing, --gpus 2): the step rows indexed w by every priced transfer pair, so a
    pair whose teacher signature no remaining layout had raised KeyError: (0, ((1, 1, 2), ...))."""
    from kdplan.search.choose import finish
    from kdplan.search.ilp import KDProgram
    p = resolve(JobSpec(teacher="gpt-2.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=2, seq_len=512,
                        global_batch=8), pins=["kd.placement=disaggregated"])
    space, blocks, sol = Planner().search(p)
    blk = blocks[sol.choices[0].block]
    stale = ((1, 1, 2), blk.student[0].sig)  # a teacher signature (dp=2) impossible on 1 teacher GPU
    assert stale[0] not in {q.sig for q in blk.teacher}
    blk.pairs[stale] = (0.0, 0.0, 0.0)
    prog = KDProgram([blk], num_gpus=2, gpus_used=[blk.arrangement.gpus_used])
    assert finish(prog, sol.optimum).choices[0].objective == pytest.approx(sol.choices[0].objective, rel=1e-9)
