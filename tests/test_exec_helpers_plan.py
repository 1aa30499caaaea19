"""The test plan builder keeps what the teacher runs in when it re-cuts a pipelined teacher's
stages for the teacher's own depth (it used to drop forward precision and offload)."""

from exec_helpers import TEACHER, layout, make_plan


def test_recut_teacher_keeps_precision_and_offload(tmp_path):
    student = layout(pp=2, dp=1)
    teacher = layout(pp=2, dp=1).model_copy(update={"forward_precision": "int8", "offload": "weights"})
    plan = make_plan(tmp_path, student, teacher)
    t = plan.teacher.layout
    assert (t.forward_precision, t.offload, t.pp) == ("int8", "weights", 2)
    assert t.stages[-1].last_layer == TEACHER.num_layers  # half-open: cut for the teacher's 2 blocks, not 4
