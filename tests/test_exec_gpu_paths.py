"""The training path as a GPU runs it, checked on CPU: tensors created on the run's device, timings
that synchronise the device, device-true peak memory, the byte-counting dispatch mode kept off the
hot path, bf16 where the plan says bf16, and the model built being the model priced (issue 12)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from exec_helpers import ROOT, STUDENT, TEACHER, layout, make_plan

EXECUTOR = ROOT / "executor"
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "eye", "linspace"}
# (file, function): tensors that live on the host by design, and why
HOST_BY_DESIGN = {
    ("executor/kd/compression.py", "__init__"): "seeded CPU projection matrix, moved to h.device when used",
    # the profiler is fixed on its own (issue 12 item 2): entries here that no longer match are harmless
    ("executor/bench/run.py", "time_fn"): "profiler",
    ("executor/bench/run.py", "loss"): "profiler",
    ("executor/bench/run.py", "topk"): "profiler",
    ("executor/bench/run.py", "host_copy"): "pinned host buffer of the host-device copy benchmark",
    ("executor/bench/run.py", "collective"): "profiler",
}


def _factory_calls_without_device():
    for path in sorted(EXECUTOR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                        and call.func.attr in FACTORIES):
                    continue
                if not any(k.arg == "device" for k in call.keywords):
                    yield str(path.relative_to(ROOT)), fn.name, call.lineno


def test_executor_creates_no_tensor_without_a_device():
    """A host tensor on a GPU run is what crashed `kdplan run` on an H200 (loss sums made on the CPU,
    all-reduced over NCCL). Every factory call names its device, or is host data by design."""
    offenders = [(f, fn, line) for f, fn, line in _factory_calls_without_device() if (f, fn) not in HOST_BY_DESIGN]
    assert not offenders, f"torch factory calls without device= (say device=..., or list why in HOST_BY_DESIGN): {offenders}"


def test_training_path_times_only_with_the_device_synchronised():
    """perf_counter around asynchronous CUDA work measures queueing, not work: the training path
    times through executor.measure.StepTimer only."""
    for name in ("train.py", "teacher.py", "pipeline.py", "parallelize.py"):
        src = (EXECUTOR / name).read_text()
        assert "perf_counter" not in src and "time.time(" not in src, name


class _Syncs:
    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.calls.append(device))


def test_step_timer_synchronises_a_cuda_device_at_both_ends(monkeypatch):
    from executor.measure import StepTimer

    syncs = _Syncs(monkeypatch)
    cuda = torch.device("cuda", 0)
    with StepTimer(cuda) as t:
        assert len(syncs.calls) == 1  # work queued before the span is not counted in it
    assert syncs.calls == [cuda, cuda] and t.elapsed_s >= 0
    with StepTimer(torch.device("cpu")):
        pass
    assert len(syncs.calls) == 2  # nothing to synchronise on the CPU


def test_teacher_wait_blocks_on_the_device(monkeypatch, tmp_path):
    """Targets.get times the wait for a received target with the device synchronised (Work.wait()
    returns before NCCL has filled the buffer)."""
    import executor.teacher as teacher

    entered = []

    class Spy:
        def __init__(self, device):
            self.device, self.elapsed_s = device, 0.5

        def __enter__(self):
            entered.append(self.device)
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(teacher, "StepTimer", Spy)
    t = teacher.Targets.__new__(teacher.Targets)
    t.store, t.mode, t.wait_s, t.device, t.V = {}, "offline", 0.0, torch.device("cpu"), 8
    t._read_offline = lambda step, m: "target"
    assert t.get(0, 0) == "target" and t.wait_s == 0.5 and entered == [torch.device("cpu")]


def test_peak_memory_on_cuda_is_reserved_plus_what_the_allocator_does_not_hold(monkeypatch):
    """Not max_memory_allocated: the allocator's cache, the CUDA context and NCCL buffers count."""
    from executor.measure import GIB, PeakMemory

    used = {"bytes": 3 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * GIB - used["bytes"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * GIB)
    mem = PeakMemory(torch.device("cuda", 0))
    mem.sample()  # 1 GiB outside the allocator (context)
    used["bytes"] = 2.5 * GIB  # later samples smaller: the largest counts
    assert mem.peak_gib() == pytest.approx(11.0)
    assert PeakMemory(torch.device("cpu")).peak_gib() > 0  # host RSS


def test_byte_counting_mode_is_entered_on_one_step_only():
    """The dispatch mode routes every aten op through Python: entered on one sampled step (not the
    first, which runs the pipeline's shape inference), never on the others."""
    from executor.train import CommBytes, SampledCommBytes

    s = SampledCommBytes(True, start=5, steps=6)
    modes = [s.at(step) for step in range(5, 11)]
    assert s.entered == 1 and [isinstance(m, CommBytes) for m in modes] == [False, True, False, False, False, False]
    one = SampledCommBytes(True, start=0, steps=1)
    assert isinstance(one.at(0), CommBytes)
    off = SampledCommBytes(False, start=0, steps=3)
    assert all(isinstance(off.at(i), contextlib.nullcontext) for i in range(3)) and off.entered == 0


@pytest.mark.parametrize("name", ["gpt-1.3b", "gpt-13b", "llama-3-8b", "qwen2.5-7b"])
def test_built_model_has_the_priced_parameter_count(name):
    """GPT presets are priced with a plain MLP, LayerNorm, learned positions and biases: the model
    built has exactly the spec's parameters (it was a gated Llama MLP, ~1.5x the MLP work)."""
    from executor.models import build_model
    from kdplan.models import preset

    spec = preset(name)
    model = build_model(spec)  # meta: no memory
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    assert hasattr(model.model.layers[0].mlp, "gate_proj") == spec.gated_mlp


def test_gpt_family_runs_with_learned_positions_in_both_forwards():
    """The executor's stage forward and HF's own forward (teacher pre-training) add the learned
    positions alike."""
    from executor.models import build_model, materialize
    from executor.pipeline import whole_model

    spec = STUDENT.model_copy(update={"family": "gpt", "gated_mlp": False, "norm": "layernorm",
                                      "learned_positions": True, "num_kv_heads": STUDENT.num_heads})
    model = materialize(build_model(spec), seed=1)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    ids = torch.randint(0, spec.vocab_size, (2, 16), device="cpu")
    with torch.no_grad():
        ours = whole_model(model)(ids)
        hf = model(input_ids=ids).logits
        model.model.embed_positions.weight.zero_()
        without = whole_model(model)(ids)
    torch.testing.assert_close(ours, hf)
    assert not torch.allclose(ours, without)  # the positions are used


def _one_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)


def test_bf16_plan_stores_the_teacher_in_bf16_and_keeps_fp32_master_weights(tmp_path):
    """The plan prices a bf16 teacher at 2 B/param and the student at 16 B/param (fp32 master
    weights and Adam state, bf16 compute): so are they built (one gloo process)."""
    import torch.distributed as dist

    from exec_helpers import make_teacher_checkpoint
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.train import RunInputs, build_student, build_teacher, compute_dtype

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    plan = make_plan(tmp_path, layout(), teacher_ckpt=ck)
    plan = plan.model_copy(update={"job": plan.job.model_copy(update={"precision": "bf16"})})
    _one_process_group(tmp_path)
    try:
        tmesh, smesh = build_meshes(plan, 0, "cpu")
        inputs = RunInputs(rows=torch.zeros(4, 33, dtype=torch.int64, device="cpu"), teacher_checkpoint=str(ck),
                           student_checkpoint=None, out_dir=tmp_path)
        cpu = torch.device("cpu")
        runner = build_teacher(plan, tmesh, inputs, cpu, ByteCounter())
        assert {p.dtype for p in runner.stage.parameters()} == {torch.bfloat16}
        ids = torch.randint(0, TEACHER.vocab_size, (2, 8), device="cpu")
        assert runner.logits(ids).dtype == torch.bfloat16
        parts, _, opts = build_student(plan, smesh, inputs, cpu, ByteCounter())
        assert {p.dtype for p in parts[0].parameters()} == {torch.float32}
        assert compute_dtype(plan) == torch.bfloat16 and parts[0].act_dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = parts[0].model.embed_tokens(ids)
            assert parts[0](ids).dtype == torch.bfloat16 and h.dtype == torch.float32  # cast in lm_forward
            # what a pipeline stage sends: the residual stream, in bf16
            from executor.models import build_model, materialize
            from executor.pipeline import make_stage
            first = materialize(make_stage(build_model(STUDENT), 0, 2, is_first=True, is_last=False,
                                           act_dtype=torch.bfloat16), seed=1)
            assert first(ids).dtype == torch.bfloat16
        # FSDP2 (one-rank mesh): fp32 shards, bf16 parameters inside the forward
        from torch.distributed.device_mesh import init_device_mesh

        from executor.models import build_model, materialize
        from executor.parallelize import apply_fsdp
        from executor.pipeline import whole_model
        model = whole_model(build_model(STUDENT), act_dtype=torch.bfloat16)
        apply_fsdp(model, init_device_mesh("cpu", (1,)), zero=3, dtype=torch.bfloat16)
        materialize(model, seed=1)
        seen = []
        q = model.model.layers["0"].self_attn.q_proj
        q.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
        model(ids).float().sum().backward()
        assert seen == [torch.bfloat16] and {p.dtype for p in model.parameters()} == {torch.float32}
        assert q.weight.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()


def test_fp16_plans_are_refused_before_any_process_group(tmp_path):
    from executor.launch import Refused, check

    plan = make_plan(tmp_path, layout())
    plan = plan.model_copy(update={"job": plan.job.model_copy(update={"precision": "fp16"})})
    with pytest.raises(Refused, match="fp16"):
        check(plan, world_size=1, device="cpu")


def test_every_point_to_point_pair_is_warmed_before_step_0(tmp_path):
    """NCCL creates a pair's communicator at its first send; created mid-step it can deadlock
    against a collective (issue 12 item 4). warm_up exchanges once over every pair listed here."""
    from executor.mesh import RoleMesh, p2p_pairs

    def mesh(role, lay, ranks, rank):
        return RoleMesh(role, tuple(ranks), lay.pp, lay.dp, lay.tp, None, rank)

    student, teacher = layout(pp=2, dp=2, ranks=[0, 1, 2, 3]), layout(tp=2, ranks=[4, 5])
    plan = make_plan(tmp_path, student, teacher, placement="disaggregated", compression="topk:16:8")
    pairs = p2p_pairs(plan, mesh("teacher", teacher, [4, 5], 0), mesh("student", student, [0, 1, 2, 3], 0))
    # student stages (p, d) -> (p + 1 mod pp, d); the teacher's last stage (tp 0) -> last student stage ranks
    assert pairs == [(0, 2), (1, 3), (2, 0), (3, 1), (4, 2), (4, 3)]
    assert p2p_pairs(plan.model_copy(update={"kd": plan.kd.model_copy(update={"mode": "offline"})}),
                     mesh("teacher", teacher, [4, 5], 0), mesh("student", student, [0, 1, 2, 3], 0)) == pairs[:4]
