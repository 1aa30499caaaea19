"""One-student runs prepare each micro-batch's teacher target once (executor.train._kd ->
kd.losses.prepare_target) and train exactly as they did from the raw targets.

The reference is the same launch with ``executor.train.prepare_target`` replaced by the identity
(a driver script around executor.launch.main), so kd_loss recomputes the teacher's side in every
chunk, forward and checkpointed backward, as one-student runs did before. On 2 gloo processes with
the layouts where the student's loss is computed on several ranks (tensor-parallel: the head's
logits replicated over tp; FSDP and DDP: the batch sharded over dp), for each target kind (dense,
top-k at 8 bits, sampled) in fp32 and bf16, online co-located and offline: every step's (total,
kd, ce) and every rank's full first-step gradients are equal. Tolerance: none (bit for bit; both
runs execute the same operations on the same numbers).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from exec_helpers import ROOT, launch, layout, make_plan, make_teacher_checkpoint, read_report, write_plan  # noqa: E402

STEPS = 3

UNPREPARED = """\
import sys
import executor.train
executor.train.prepare_target = lambda target, **kw: target  # raw targets into kd_loss, as before
from executor.launch import main
sys.exit(main())
"""

CASES = {
    # name: (student layout, teacher layout, kd overrides, precision)
    "tp-dense-bf16": (layout(tp=2), layout(tp=2), {}, "bf16"),
    "fsdp-topk-fp32": (layout(dp=2, zero=3), layout(dp=2), {"compression": "topk:16:8"}, "fp32"),
    "ddp-offline-sampled-bf16": (layout(dp=2), layout(dp=2), {"mode": "offline", "compression": "topk:4+sample:8",
                                                              "loss": "forward_kl"}, "bf16"),
    "ddp-dense-jsd-fp32": (layout(dp=2, mb=1), layout(dp=2, mb=2), {"loss": "jsd"}, "fp32"),
}


def _launch_unprepared(tmp, plan_path, *args):
    driver = tmp / "unprepared.py"
    driver.write_text(UNPREPARED)
    env = dict(os.environ, OMP_NUM_THREADS="1", KDPLAN_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(plan_path), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _run(tmp, name, plan, prepared: bool):
    path = write_plan(tmp / f"{name}.json", plan)
    args = ("--steps", STEPS, "--report", tmp / f"{name}.report.json", "--dump-grads", tmp / f"{name}.grads",
            "--output-dir", tmp / f"out-{name}")
    r = launch(path, 2, *args) if prepared else _launch_unprepared(tmp, path, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    grads = {int(f.stem.removeprefix("rank")): torch.load(f, weights_only=True)
             for f in sorted((tmp / f"{name}.grads").glob("rank*.pt"))}
    report = read_report(tmp / f"{name}.report.json")
    return [(p["total"], p["kd"], p["ce"]) for p in report["measured"]["loss"]], grads


@pytest.mark.parametrize("name", list(CASES))
def test_prepared_run_equals_the_unprepared_run_bit_for_bit(tmp_path, name):
    student, teacher, kd, precision = CASES[name]
    plan = make_plan(tmp_path, student, teacher, teacher_ckpt=make_teacher_checkpoint(tmp_path / "teacher"), **kd)
    plan = plan.model_copy(update={"job": plan.job.model_copy(update={"precision": precision})})
    got, got_grads = _run(tmp_path, "prepared", plan, True)
    want, want_grads = _run(tmp_path, "unprepared", plan, False)
    assert len(got) == STEPS and all(x[1] > 0 for x in got)  # a KD run, every step reported
    assert got == want, (got, want)
    assert set(got_grads) == set(want_grads) == {0, 1}
    for rank in got_grads:
        assert set(got_grads[rank]) == set(want_grads[rank]) and got_grads[rank]
        for k, g in got_grads[rank].items():
            assert torch.equal(g, want_grads[rank][k]), (name, rank, k)
