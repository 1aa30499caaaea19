"""The plan is the contract, executor side (issue 14): what a plan field asks for is what runs.

Single-process tests in a gloo world of one (as tests/test_exec_quant.py): the teacher's own
micro-batch, and the run / KD settings each change the losses of a short run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from exec_helpers import TEACHER, layout, make_plan, make_teacher_checkpoint  # noqa: E402


@pytest.fixture
def world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Counting:
    """A TeacherRunner stand-in around the real one: records the batch size of every forward."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []
        self.device = runner.device

    def logits(self, ids):
        self.batches.append(ids.shape[0])
        return self.runner.logits(ids)


def test_the_teacher_runs_its_own_micro_batch(world_of_one, tmp_path):
    """Student micro-batch 2 (4 micro-batches of a global batch of 8): a teacher micro-batch of 1,
    2, 3, 4 or 8 runs the teacher on that many sequences per forward (3: 3, 3, 2), and the student
    receives the same targets whatever it is."""
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.teacher import Targets
    from executor.train import Data, RunInputs, build_teacher

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    rows = torch.randint(0, TEACHER.vocab_size, (16, 33), generator=torch.Generator().manual_seed(5))
    targets = {}
    for tmb in (1, 2, 3, 4, 8):
        plan = make_plan(tmp_path, layout(mb=2), layout(mb=tmb), teacher_ckpt=ck, global_batch=8)
        tmesh, smesh = build_meshes(plan, 0, "cpu")
        inputs = RunInputs(rows=rows, teacher_checkpoint=str(ck), student_checkpoint=None, out_dir=tmp_path)
        runner = _Counting(build_teacher(plan, tmesh, inputs, torch.device("cpu"), ByteCounter()))
        data = Data(rows, plan)
        t = Targets(plan, tmesh=tmesh, smesh=smesh, runner=runner, microbatch=data.microbatch,
                    n_micro=data.n_micro, vocab_size=TEACHER.vocab_size, counter=ByteCounter())
        t.teacher_phase(0)
        assert runner.batches == [min(tmb, 8 - i) for i in range(0, 8, tmb)], (tmb, runner.batches)
        assert not t._chunks  # every chunk served and released
        targets[tmb] = torch.cat([t.get(0, m).logits for m in range(data.n_micro)])
    for tmb in (1, 3, 4, 8):
        torch.testing.assert_close(targets[tmb], targets[2], rtol=1e-4, atol=1e-4)
