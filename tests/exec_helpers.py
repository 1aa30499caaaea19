"""Hand-written plans and launch helpers for the executor tests (no planner needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kdplan.schema import (BaselinePrediction, Baselines, JobSummary, KDPlan, Layout, ModelSpec, Plan, Prediction,
                           RolePlan, RunSettings, Stage)
from kdplan.schema.layers import layer_ranges, split_layers

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. ") * 60

VOCAB = 320  # byte-level BPE: 256 bytes + EOS + a few merges


def spec(name: str, layers: int, hidden: int, heads: int = 4, kv: int = 2) -> ModelSpec:
    return ModelSpec(name=name, family="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv, ffn_hidden_size=2 * hidden, vocab_size=VOCAB, max_positions=256)


TEACHER = spec("tiny-teacher", 2, 64)
STUDENT = spec("tiny-student", 4, 32)  # 4 blocks: room for 2 stages x 2 virtual stages


def layout(tp=1, pp=1, dp=1, *, zero=0, mb=2, ranks=None, schedule="1f1b", virtual=1, sp=False, recompute="none",
           grad="none", layers=4) -> Layout:
    ranges = layer_ranges(split_layers(layers, pp * virtual))
    stages = [Stage(first_layer=a, last_layer=b) for a, b in ranges] if pp > 1 else []
    return Layout(tp=tp, pp=pp, dp=dp, zero=zero, micro_batch=mb, num_gpus=tp * pp * dp, ranks=ranks or [],
                  schedule=schedule, virtual_stages=virtual, sequence_parallel=sp, recompute=recompute,
                  grad_compression=grad, stages=stages)


def make_plan(tmp: Path, student: Layout, teacher: Layout | None = None, *, world: int | None = None,
              mode="online", placement="colocated", compression="dense", global_batch=8, seq_len=32,
              teacher_ckpt: Path | None = None, checkpoint_every=0, loss="forward_kl") -> Plan:
    if teacher is None:  # the student's split, forward only (no gradient, optimizer or recompute settings)
        teacher = student.model_copy(update=dict(zero=0 if student.zero < 3 else 3, recompute="none",
                                                 grad_compression="none", offload="none"))
    if teacher.stages:  # re-cut for the teacher's own depth; what the teacher runs in is kept
        teacher = layout(teacher.tp, teacher.pp, teacher.dp, zero=teacher.zero, mb=teacher.micro_batch,
                         ranks=teacher.ranks, layers=TEACHER.num_layers).model_copy(
            update={"forward_precision": teacher.forward_precision, "offload": teacher.offload})
    if world is None:
        used = set(student.ranks or range(student.num_gpus)) | set(teacher.ranks or range(teacher.num_gpus))
        world = len(used) if placement == "colocated" or mode == "offline" else student.num_gpus + teacher.num_gpus
    data = tmp / "data.txt"
    if not data.exists():
        data.write_text(TEXT)
    return Plan(
        job=JobSummary(cluster="cpu-local", gpus=world, gpus_per_node=world, device_kind="cpu",
                       seq_len=seq_len, global_batch=global_batch, precision="fp32"),
        teacher=RolePlan(source="test", model=TEACHER, layout=teacher),
        student=RolePlan(source="test", model=STUDENT, layout=student),
        kd=KDPlan(mode=mode, placement=placement, compression=compression, temperature=2.0, alpha=0.5, loss=loss),
        prediction=Prediction(step_time_s=0.1, tokens_per_s=1.0, mfu=0.0, memory_per_gpu_gib=0.1,
                              comm_bytes_per_step=0.0, utilization=1.0),
        run=RunSettings(data=str(data), teacher_checkpoint=str(teacher_ckpt) if teacher_ckpt else None,
                        output_dir=str(tmp / "out"), checkpoint_every=checkpoint_every, lr=1e-2, seed=3),
        world_size=world,
    )


def with_baselines(plan: Plan, *, naive_dp: Layout | None = None, single: Layout | None = None,
                   mirror: Layout | None = None, step_time_s=(0.5, 0.9, 0.7)) -> Plan:
    """``plan`` carrying baseline layouts (as kdplan.cost.baselines writes them; the teacher
    mirrors each student layout) with made-up predicted step times (naive DP, single, mirror)."""
    def one(lay, t):
        if lay is None:
            return BaselinePrediction(reason="not in this test")
        return BaselinePrediction(step_time_s=t, memory_per_gpu_gib=0.1, comm_bytes_per_step=1e6, utilization=0.5,
                                  student=lay, teacher=layout(lay.tp, lay.pp, lay.dp, mb=lay.micro_batch,
                                                              layers=TEACHER.num_layers))
    b = Baselines(naive_dp=one(naive_dp, step_time_s[0]), single_gpu=one(single, step_time_s[1]),
                  mirror=one(mirror, step_time_s[2]))
    return plan.model_copy(update={"prediction": plan.prediction.model_copy(update={"baselines": b})})


def write_plan(path: Path, plan: Plan) -> Path:
    path.write_text(plan.model_dump_json(indent=1))
    return path


def make_teacher_checkpoint(path: Path) -> Path:
    """A random tiny teacher saved as an HF safetensors directory (no process group needed)."""
    from executor.models import build_model, materialize, save_checkpoint

    if not (path / "model.safetensors").exists():
        save_checkpoint(materialize(build_model(TEACHER), seed=11), path)
    return path


def launch(plan_path: Path, nproc: int, *args, out: Path | None = None, timeout=300) -> subprocess.CompletedProcess:
    """torchrun --standalone (nproc > 1) or plain python (nproc = 1) on executor.launch."""
    # PYTHONPATH keeps what is there (the GPU check carries pydantic & co. on it)
    env = dict(os.environ, OMP_NUM_THREADS="1", KDPLAN_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            if nproc > 1 else [sys.executable])
    cmd = [*head, "-m", "executor.launch", str(plan_path), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def losses(report: dict) -> list[float]:
    return [p["total"] for p in report["measured"]["loss"]]
