"""The step simulator against closed forms on cases simple enough to solve by hand."""

import json

import pytest

from kdplan.sim.engine import Graph
from kdplan.sim.schedules import rank_ops
from kdplan.sim.step import StudentInput, TeacherInput, simulate_step
from kdplan.sim.trace import chrome_trace

TF, TB = 1.0, 2.0  # forward / backward seconds per micro-batch per stage


def pipe(p, m, schedule="1f1b", v=1, **kw):
    return StudentInput([TF / v] * (p * v), [TB / v] * (p * v), m, pp=p, schedule=schedule, **kw)


def gpu_tracks(r):
    return [t for t in r.tracks if t.kind == "gpu"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (2, 3), (4, 4), (4, 16), (8, 5)])
def test_balanced_pipeline_matches_closed_form(schedule, p, m):
    r = simulate_step(pipe(p, m, schedule))
    assert r.step_time_s == pytest.approx((m + p - 1) * (TF + TB), rel=1e-12)
    for t in gpu_tracks(r):  # every rank idles exactly the bubble share
        assert t.idle_s.get("bubble", 0.0) / r.step_time_s == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert t.busy_s + sum(t.idle_s.values()) == pytest.approx(r.step_time_s)
    assert r.breakdown_s == pytest.approx({"compute": m * (TF + TB), "bubble": (p - 1) * (TF + TB)}
                                          if p > 1 else {"compute": m * (TF + TB)})
    assert r.utilization["student"] == pytest.approx(m / (m + p - 1))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 3), (8, 8, 2)])
def test_interleaved_bubble_shrinks_by_v(p, m, v):
    r = simulate_step(pipe(p, m, "interleaved_1f1b", v))
    ideal = m * (TF + TB)
    # Narayanan et al. 2021: bubble (p-1)(tf+tb)/v, i.e. (p-1)/(v m) of the ideal time
    assert (r.step_time_s - ideal) / ideal == pytest.approx((p - 1) / (v * m), rel=1e-12)


@pytest.mark.parametrize("p,m", [(4, 2), (4, 4), (4, 12), (6, 20)])
def test_1f1b_keeps_at_most_p_micro_batches_on_stage_0(p, m):
    assert simulate_step(pipe(p, m, "1f1b")).max_in_flight_stage0 == min(p, m)
    assert simulate_step(pipe(p, m, "gpipe")).max_in_flight_stage0 == m


def test_schedules_run_every_op_once():
    for sched, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 3)):
        for r in range(4):
            ops = rank_ops(sched, 8, 4, v, r)
            assert sorted(ops) == sorted((k, j, c) for k in "FB" for j in range(8) for c in range(v))
    with pytest.raises(ValueError, match="divisible by pp"):
        rank_ops("interleaved_1f1b", 6, 4, 2, 0)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3)])
def test_every_pipeline_shape_runs_without_deadlock(schedule, v):
    for p in range(1, 6):
        for m in range(1, 13):
            if v > 1 and m % p:
                continue
            r = simulate_step(StudentInput([TF / v] * p * v, [TB / v] * p * v, m, pp=p, schedule=schedule,
                                           p2p_s=[0.1] * p * v, dp_reduce_s=0.5),
                              TeacherInput("colocated", [0.5] * p, p2p_s=[0.05] * p))
            ideal = m * (0.5 + TF + TB)
            # no faster than the work, no slower than every slot paying the sends both ways
            assert ideal <= r.step_time_s <= (m + p - 1) * (0.5 + TF + TB + 2 * (0.1 + 0.05)) + 0.5 + 1e-9


def test_p2p_is_exposed_on_the_fill_and_drain():
    c, p = 0.25, 4
    # one micro-batch is a pure chain: every boundary crossed once each way
    one = simulate_step(StudentInput([TF] * p, [TB] * p, 1, pp=p, p2p_s=[c] * p))
    assert one.step_time_s == pytest.approx(p * (TF + TB) + 2 * (p - 1) * c)
    assert one.breakdown_s["pipeline"] == pytest.approx(2 * (p - 1) * c)
    # many: at least the fill and drain crossings, at most every slot lengthened by a round trip
    m = 8
    r = simulate_step(StudentInput([TF] * p, [TB] * p, m, pp=p, p2p_s=[c] * p))
    assert (m + p - 1) * (TF + TB) + 2 * (p - 1) * c <= r.step_time_s <= (m + p - 1) * (TF + TB + 2 * c)


def test_dp_reduce_only_the_last_bucket_is_exposed():
    m, n = 4, 4
    hidden = simulate_step(StudentInput([TF], [TB], m, dp_reduce_s=1.0, dp_buckets=n, optimizer_s=0.5))
    assert hidden.step_time_s == pytest.approx(m * (TF + TB) + 1.0 / n + 0.5)
    assert hidden.breakdown_s["gradients"] == pytest.approx(1.0 / n)
    # a reduction longer than the last backward: everything after the first bucket's ready time shows
    slow = simulate_step(StudentInput([TF], [TB], m, dp_reduce_s=10.0, dp_buckets=n))
    assert slow.step_time_s == pytest.approx(m * (TF + TB) + 10.0 + TB / n - TB)


def test_colocated_teacher_adds_to_the_student():
    tt, m = 1.5, 4
    r = simulate_step(StudentInput([TF], [TB], m), TeacherInput("colocated", [tt]))
    assert r.step_time_s == pytest.approx(m * tt + m * (TF + TB))
    assert r.breakdown_s["teacher_forward"] == pytest.approx(m * tt)
    # mirror layout on a pipeline: the teacher's forward lengthens every forward slot
    p = 4
    r = simulate_step(pipe(p, 8), TeacherInput("colocated", [tt] * p))
    assert r.step_time_s == pytest.approx((8 + p - 1) * (tt + TF + TB))


@pytest.mark.parametrize("tt,x", [(1.0, 0.5), (2.9, 0.5), (4.0, 0.5), (2.0, 5.0), (0.0, 4.0)])
def test_disaggregated_step_is_the_slowest_of_teacher_student_and_link(tt, x):
    m = 4
    r = simulate_step(StudentInput([TF], [TB], m), TeacherInput("disaggregated", [tt], transfer_s=x))
    student, teacher, link = m * (TF + TB), m * tt, m * x
    # the queue (2 in flight) hides everything but the slowest stream in steady state
    assert r.step_time_s == pytest.approx(max(student, teacher, link), rel=1e-9)
    assert (r.teacher_wait_s + r.breakdown_s.get("teacher_outputs", 0) > 0) == (max(teacher, link) > student)
    assert r.utilization["student"] == pytest.approx(student / r.step_time_s)


def test_disaggregated_queue_of_one_exposes_the_round_trip():
    m, tt, x = 4, 2.0, 2.5

    def step(k):
        return simulate_step(StudentInput([TF], [TB], m),
                             TeacherInput("disaggregated", [tt], transfer_s=x, max_in_flight=k)).step_time_s
    # one buffer: output j is sent only after the loss read j-1, and x > TB cannot hide behind B(j-1)
    assert step(1) == pytest.approx(m * (TF + TB) + m * (x - TB))
    assert step(2) == pytest.approx(m * (TF + TB))


def test_deep_teacher_pipeline_keeps_its_throughput():
    # a 4-stage teacher whose stages each take as long as the student's micro-batch: the queue
    # bound counts the teacher's own pipeline depth, so the teacher is not throttled to 2 in flight
    m, pt = 8, 4
    r = simulate_step(StudentInput([TF], [TB], m), TeacherInput("disaggregated", [TF + TB] * pt, transfer_s=0.1))
    assert r.step_time_s == pytest.approx(m * (TF + TB))


def test_offline_reads_hide_behind_compute():
    m = 4
    assert simulate_step(StudentInput([TF], [TB], m), TeacherInput("offline", transfer_s=0.5)).step_time_s == \
        pytest.approx(m * (TF + TB))
    assert simulate_step(StudentInput([TF], [TB], m), TeacherInput("offline", transfer_s=4.0)).step_time_s == \
        pytest.approx(m * 4.0)


def test_engine_detects_deadlock():
    g = Graph()
    a, b = g.add("x", "a", "forward", 1.0), g.add("y", "b", "forward", 1.0)
    g.after(a, b)
    g.after(b, a)
    with pytest.raises(RuntimeError, match="deadlock"):
        g.run()


def test_trace_is_valid_json_one_track_per_gpu(tmp_path):
    p, pt = 4, 2
    r = simulate_step(StudentInput([TF] * p, [TB] * p, 8, pp=p, p2p_s=[0.1] * p, dp_reduce_s=1.0),
                      TeacherInput("disaggregated", [1.0] * pt, p2p_s=[0.1] * pt, transfer_s=0.5))
    path = tmp_path / "t.json"
    path.write_text(json.dumps(chrome_trace(r)))
    trace = json.loads(path.read_text())["traceEvents"]
    threads = {(e["pid"], e["args"]["name"]) for e in trace if e["name"] == "thread_name"}
    student = sorted(n for pid, n in threads if pid == 1 and "grad-sync" not in n)
    teacher = sorted(n for pid, n in threads if pid == 2)
    assert student == [f"student s{i}" for i in range(p)] and teacher == [f"teacher s{i}" for i in range(pt)]
    assert any(pid == 3 for pid, _ in threads)  # links on their own tracks
    spans = [e for e in trace if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(r.step_time_s * 1e6, rel=1e-6)


def test_streaming_teacher_pays_no_per_step_pipeline_fill():
    # a 3-stage teacher slower than the student: it streams across steps, so the step is its
    # slowest stage's work, (m + pt - 1) stage times would be a per-step flush it never does
    m, tt = 4, [0.9, 1.0, 0.95]
    r = simulate_step(StudentInput([0.2], [0.3], m), TeacherInput("disaggregated", tt, transfer_s=0.05))
    assert r.step_time_s == pytest.approx(m * max(tt))
    teacher = {t.track: t for t in r.tracks if t.role == "teacher" and t.kind == "gpu"}
    assert teacher["teacher s1"].busy_s == pytest.approx(r.step_time_s)  # the bottleneck never idles
    assert r.utilization["teacher"] == pytest.approx(m * sum(tt) / (3 * r.step_time_s))
    assert r.teacher_wait_s == pytest.approx(r.step_time_s - m * 0.5, rel=0.05)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_blocking_sends_lengthen_every_slot_like_the_closed_form(schedule):
    """Blocking sends (Megatron 1F1B's send/recv pairs) occupy the sender: each stage's slot is
    TF + TB + its sends (one each way inside the pipeline, one at the ends), and the step is the
    cost model's m * max(slot) + sum(slot) - max(slot)."""
    p, m, c = 4, 8, 0.4
    slots = [TF + TB + c * ((i < p - 1) + (i > 0)) for i in range(p)]
    closed = m * max(slots) + sum(slots) - max(slots)
    r = simulate_step(StudentInput([TF] * p, [TB] * p, m, pp=p, p2p_s=[c] * p, schedule=schedule),
                      blocking_p2p=True)
    overlapped = simulate_step(StudentInput([TF] * p, [TB] * p, m, pp=p, p2p_s=[c] * p, schedule=schedule))
    assert r.step_time_s == pytest.approx(closed, rel=0.01)  # 1F1B: the end stages' shorter slots help a little
    assert r.step_time_s > overlapped.step_time_s  # overlapped sends hide at least part of each slot's sends
    assert not any(t.track.startswith("link") for t in r.tracks)  # sends ran on the GPUs' streams
