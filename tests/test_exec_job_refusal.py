"""`kdplan run` and whole-job plans the executor cannot run (issue 16): a job whose teacher runs
on its own GPUs and streams to students side by side (prediction.job.strategy
disaggregated_fanout) is refused in one line naming what is missing, before any process starts."""

import pytest

from conftest import ROOT
from executor.launch import Refused, check
from kdplan.jobs import load_job, resolve
from kdplan.planner import make_plan
from kdplan.schema.plan import JobPhase, JobPrediction, StudentJob


def _tiny_plan():
    spec = load_job(str(ROOT / "examples" / "tiny-cpu" / "job.toml"))
    return make_plan(resolve(spec, job_path=str(ROOT / "examples" / "tiny-cpu" / "job.toml")), top_k=0)


def test_disaggregated_fanout_is_refused_in_one_line():
    plan = _tiny_plan()
    check(plan, world_size=plan.world_size, device="cpu")  # the step plan itself runs
    job = JobPrediction(strategy="disaggregated_fanout", students_arrangement="side_by_side", teacher_gpus=2,
                        total_time_s=3.0, teacher_passes=1, dataset_tokens=1, tokens_per_student=1, epochs=1,
                        students=[StudentJob(student="a", step_time_s=1, steps=1, gpus=1),
                                  StudentJob(student="b", step_time_s=1, steps=1, gpus=1)],
                        timeline=[JobPhase(name="teacher (own GPUs, online)", start_s=0, duration_s=3, gpus=2)])
    plan = plan.model_copy(update={"prediction": plan.prediction.model_copy(update={"job": job})})
    with pytest.raises(Refused) as e:
        check(plan, world_size=plan.world_size, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert "prediction.job.strategy = disaggregated_fanout" in msg and "from its own 2 GPUs" in msg
    assert "does not run" in msg
