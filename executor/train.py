"""The distillation loop: one code path from one process to any (teacher, student) layout.

Read top to bottom: meshes -> data -> teacher (meta, parallelise, load weights, freeze) ->
student (meta, pipeline split, parallelise, init) -> optimiser -> per step: teacher targets,
KD loss on every micro-batch normalised by the GLOBAL number of valid tokens, backward, step.
Everything measured here is per rank; rank "reporter" (last student stage, dp 0, tp 0) gathers
it for the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from kdplan.schema import Plan
from kdplan.schema.capability import students_one_after_another, writes_cache_online

from . import checkpoint as ckpt
from .data import Batches, sample_hash
from .kd.grad_hooks import ByteCounter
from .kd.losses import IGNORE_INDEX, TeacherTarget, kd_loss, loss_dtype, prepare_target
from .measure import GIB, PeakMemory, SpanClock, StepTimer, stored_bytes
from .mesh import RoleMesh, build_meshes, role_ranks, warm_up
from .models import build_model, load_checkpoint, materialize
from .quant import load_teacher
from .parallelize import GradSync, needs_grad_sync, parallelize_student, parallelize_teacher
from .pipeline import build_schedule, build_stages, make_stage, stage_layer_ranges
from .teacher import Targets, TeacherRunner, WeightStream
from .teacher_cache import cache_dir, cache_key

WARMUP_STEPS = 2


@dataclass
class RunInputs:
    """What the launcher prepared before the process group existed (under a file lock)."""

    rows: torch.Tensor  # [n, seq_len + 1] training rows
    teacher_checkpoint: str | None  # HF directory with safetensors (None: no teacher)
    student_checkpoint: str | None
    out_dir: Path
    teacher_key: str = ""  # identity of the teacher weights (offline cache key)
    checkpoint_dir: Path | None = None  # this run's own checkpoints (executor.runs; None: out_dir/checkpoints)

    @property
    def run_dir(self) -> Path:
        return self.checkpoint_dir or self.out_dir / "checkpoints"


@dataclass
class StudentStats:
    """One student's share of a run with several students (plan.extra_students), on this rank."""

    source: str  # the student's RolePlan.source
    step_times_s: list[float] = field(default_factory=list)  # its span of each step (SpanClock)
    bytes: dict[str, float] = field(default_factory=dict)  # per step, by kind, sent for this student
    losses: list[tuple[int, float, float, float]] = field(default_factory=list)


@dataclass
class RankStats:
    rank: int
    role: str
    step_times_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    bytes: dict[str, float] = field(default_factory=dict)
    peak_memory_gib: float = 0.0  # executor.measure.PeakMemory: device memory on CUDA, RSS on CPU
    teacher_weights_gib: float = 0.0  # the teacher stage's parameters + buffers held here, as stored
    losses: list[tuple[int, float, float, float]] = field(default_factory=list)
    busy: float = 1.0
    teacher_s: list[float] = field(default_factory=list)  # with a teacher: the teacher phase of each step
    # (co-located online: forwards, encode, decode; several students: also the offline cache read and the
    # loss's teacher side, prepared once for all; one student prepares its targets in its own loss, _kd)
    students: list[StudentStats] = field(default_factory=list)  # several students: plan order, `student` first
    cache_write_bytes: float = 0.0  # teacher outputs this rank wrote to the cache (offline pass, online_then_cache)


class CommBytes(TorchDispatchMode):
    """Counts the bytes DTensor puts into functional collectives (tensor-parallel traffic).

    A dispatch mode sends every aten op through Python, which would make a GPU step CPU-bound:
    it is entered on one sampled step only (``SampledCommBytes``), whose count stands for every step
    (TP traffic depends on shapes only, and the shapes are the same every step)."""

    OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast")

    def __init__(self, counter: ByteCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if "_c10d_functional" in str(func) and name.split(".")[0] in self.OPS:
            t = args[0]
            if isinstance(t, torch.Tensor):
                self.counter.add("tensor_parallel", t.numel() * t.element_size())
        return func(*args, **(kwargs or {}))


class SampledCommBytes:
    """``CommBytes`` on step ``start + SAMPLED_STEP`` (or the last step of a shorter run) and no
    other: the first step also runs one-off work (the pipeline's shape inference, lazy inits).
    ``at(step)`` is the context for a step; ``per_step()`` the sampled step's bytes."""

    SAMPLED_STEP = 1

    def __init__(self, enabled: bool, start: int, steps: int):
        self.counter = ByteCounter()
        self.step = start + min(self.SAMPLED_STEP, max(steps - 1, 0)) if enabled else None
        self.entered = 0

    def at(self, step: int):
        if step != self.step:
            return contextlib.nullcontext()
        self.entered += 1
        return CommBytes(self.counter)

    def per_step(self) -> dict[str, int]:
        return self.counter.as_dict()


class Data:
    """Micro-batches by (step, student dp shard, micro-batch index), a pure function of the step."""

    def __init__(self, rows: torch.Tensor, plan: Plan, layout=None):
        s = layout or plan.student.layout
        self.batches = Batches(rows, global_batch=plan.job.global_batch, seed=plan.run.seed)
        self.dp, self.mb = s.dp, s.micro_batch
        self.local = plan.job.global_batch // s.dp
        self.n_micro = self.local // self.mb
        self._cache: tuple[int, torch.Tensor] | None = None

    def _global(self, step: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != step:
            self._cache = (step, self.batches.global_batch_at(step))
        return self._cache[1]

    @property
    def num_rows(self) -> int:
        """Samples in the dataset (each epoch visits every one once when it is whole global batches)."""
        return self.batches.data.shape[0]

    def rows(self, step: int, shard: int, m: int) -> torch.Tensor:
        """Dataset row ids of micro-batch ``m`` of ``shard`` at ``step``."""
        a = shard * self.local + m * self.mb
        return self.batches.global_indices(step)[a:a + self.mb]

    def microbatch(self, step: int, shard: int, m: int):
        a = shard * self.local + m * self.mb
        rows = self._global(step)[a:a + self.mb]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), [sample_hash(r) for r in rows]

    def shard(self, step: int, shard: int):
        rows = self._global(step)[shard * self.local:(shard + 1) * self.local]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def global_valid_tokens(self, step: int) -> int:
        return int((self._global(step)[:, 1:] != IGNORE_INDEX).sum())


def _device(plan: Plan) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if plan.job.device_kind == "gpu" else torch.device("cpu")


def build_teacher(plan: Plan, tmesh: RoleMesh, inputs: RunInputs, device, counter: ByteCounter) -> TeacherRunner:
    """One forward-only stage per teacher pp rank, from the meta model, then the checkpoint."""
    spec, layout = plan.teacher.model, plan.teacher.layout
    meta = build_model(spec, dtype=compute_dtype(plan))
    ranges = stage_layer_ranges(layout.model_copy(update={"virtual_stages": 1, "stages": []}), spec.num_layers) \
        if len(layout.stages) != layout.pp else [(s.first_layer, s.last_layer) for s in layout.stages]
    p = tmesh.pp_rank
    stage = make_stage(meta, *ranges[p], is_first=p == 0, is_last=p == layout.pp - 1, act_dtype=compute_dtype(plan))
    # the plan's teacher precision: fp8 / int8 block Linears stored quantized (executor/quant.py)
    offload = layout.offload == "weights"  # loaded into host memory, streamed block by block (WeightStream)
    stage = parallelize_teacher(stage, tmesh, layout=layout, counter=counter,
                                init=lambda m: load_teacher(m, inputs.teacher_checkpoint, layout.forward_precision,
                                                            device="cpu" if offload else device,
                                                            dtype=compute_dtype(plan)))
    if offload:
        WeightStream(stage, device, counter)
    gather = 0.0
    if layout.zero >= 3 and layout.dp > 1:  # FSDP all-gathers the other dp ranks' shards for each forward
        gather = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                     for p in stage.parameters()) * (layout.dp - 1)
    return TeacherRunner(stage, tmesh, spec.hidden_size, counter, device, dtype=compute_dtype(plan),
                         gather_bytes=gather)


def compute_dtype(plan: Plan) -> torch.dtype:
    """The dtype the plan prices compute in: bf16 (on GPUs and, emulated and slow, on CPUs) or fp32.

    Student: bf16 compute over fp32 master weights, fp32 gradients and fp32 Adam state, 16 bytes per
    parameter as the cost model counts them (kdplan/cost/memory.py: 2 + 2 + 12): FSDP2 keeps fp32
    shards and gathers bf16 (MixedPrecisionPolicy, fp32 reduce-scatter); DDP / TP / plain keep fp32
    parameters and run the blocks under bf16 autocast, with a bf16 residual stream so that
    sequence-parallel gathers and pipeline sends move 2-byte activations; autocast's bf16 weight
    copies live through the step (saved for backward): 2 B/param more at peak than priced.
    Teacher: stored in bf16 (2 bytes per parameter; an fp8 / int8 teacher's block Linears 1 byte plus an
    fp32 scale per output channel, executor/quant.py) and run without autocast."""
    assert plan.job.precision != "fp16", "launch.check refuses fp16 plans"
    return torch.bfloat16 if plan.job.precision == "bf16" else torch.float32


def build_student(plan: Plan, smesh: RoleMesh, inputs: RunInputs, device, counter: ByteCounter):
    layout = plan.student.layout
    meta = build_model(plan.student.model)  # fp32 master weights (see compute_dtype)
    parts, stage_ids = build_stages(meta, layout, smesh.pp_rank, act_dtype=compute_dtype(plan))

    def init(m):
        if inputs.student_checkpoint:
            return load_checkpoint(m, inputs.student_checkpoint, device=device)
        return materialize(m, seed=plan.run.seed, device=device)

    parts = [parallelize_student(p, smesh, layout=layout, counter=counter, init=init, dtype=compute_dtype(plan))
             for p in parts]
    opts = [torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=plan.run.lr,
                              weight_decay=plan.run.weight_decay) for p in parts]
    return parts, stage_ids, opts


def _grad_sync_ctx(part, last: bool, keep_gathered: bool = False):
    """Skip gradient communication on all but the last micro-batch of a step. ``keep_gathered``
    (ZeRO-1/2: weights are not sharded between passes) also keeps FSDP's gathered parameters
    from one micro-batch to the next: one all-gather per step, as ZeRO-2 does, not one per
    micro-batch (they are resharded after the last backward, before the optimizer step)."""
    if hasattr(part, "no_sync") and not last:
        return part.no_sync()
    if hasattr(part, "set_requires_gradient_sync"):
        part.set_requires_gradient_sync(last)
        if keep_gathered:
            part.set_reshard_after_backward(last)
    return contextlib.nullcontext()


def _fsdp_bytes(parts, layout, n_micro: int, dtype: torch.dtype) -> dict[str, float]:
    """FSDP2's collectives are issued inside torch; count them from the shard sizes each step:
    one fp32 reduce-scatter of gradients per step; all-gathers of parameters in the compute
    ``dtype``: ZeRO-3 two per micro-batch (forward and backward), ZeRO-1/2 one per step
    (_grad_sync_ctx keeps them)."""
    if layout.dp == 1 or layout.zero == 0:
        return {}
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for part in parts for p in part.parameters())
    sent = local * (layout.dp - 1)  # a ring sends every other rank's share once
    gathers = n_micro * 2 if layout.zero >= 3 else 1
    return {"gradients": float(sent * 4), "params": float(sent * dtype.itemsize * gathers)}


def recut_target(targets: Targets, step: int, first: int, rows: int, primary_mb: int, seq_len: int):
    """The teacher target of this rank's local sequences [first, first + rows) of ``step``, cut
    from the targets of ``plan.student``'s micro-batches (``primary_mb`` sequences each, the ones
    the teacher phase produced): another student's micro-batch, whatever its size, gets the same
    rows of the same teacher outputs (no second teacher forward)."""
    lo, hi = first // primary_mb, (first + rows - 1) // primary_mb
    if lo == hi and first % primary_mb == 0 and rows == primary_mb:
        return targets.get(step, lo)
    whole = TeacherTarget.cat([targets.get(step, i) for i in range(lo, hi + 1)]) if hi > lo else targets.get(step, lo)
    a = (first - lo * primary_mb) * seq_len
    return whole[a:a + rows * seq_len]


class CoStudent:
    """A student of ``plan.extra_students``, trained in the same run as ``plan.student`` from the same
    teacher forward: its own model (initialised from ``run.seed`` as a run of it alone would be;
    ``run.student_checkpoint`` is ``student``'s), optimizer, DDP / FSDP wrapper over its layout
    (launch.check: the same ranks, pp = 1, and tp and dp equal to ``student``'s, so the student
    mesh is its mesh too), gradient sync, byte counter and micro-batches."""

    def __init__(self, plan: Plan, k: int, smesh: RoleMesh, inputs: RunInputs, device):
        role = plan.extra_students[k]
        self.key = f"extra_students{k}"
        self.plan = plan.model_copy(update={"student": role, "extra_students": []})
        self.layout = role.layout
        self.counter = ByteCounter()
        self.data = Data(inputs.rows, self.plan)
        self.parts, stage_ids, self.opts = build_student(
            self.plan, smesh, dataclasses.replace(inputs, student_checkpoint=None), device, self.counter)
        self.stage_ids = [f"{i}_{self.key}" for i in stage_ids]  # checkpoint keys of their own
        self.grad_sync = (GradSync(smesh.group("dp"), grad_compression=self.layout.grad_compression,
                                   counter=self.counter) if needs_grad_sync(self.layout) else None)
        self.stats = StudentStats(role.source)

    def step(self, step: int, smesh: RoleMesh, targets: Targets | None, primary: Data, n_global: int, device):
        """Micro-batches, gradient sync and optimizer step of ``step``; returns the (total, kd, ce)
        sums over this rank's tokens, on the device (no host sync)."""
        lay, kd, V = self.layout, self.plan.kd, self.plan.student.model.vocab_size
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        n = self.data.n_micro
        for m in range(n):
            ids, labels, _ = self.data.microbatch(step, smesh.dp_rank, m)
            target = None
            if targets is not None:
                target = recut_target(targets, step, m * lay.micro_batch, lay.micro_batch, primary.mb,
                                      self.plan.job.seq_len)
            with _grad_sync_ctx(self.parts[0], m == n - 1, keep_gathered=0 < lay.zero < 3):
                r = _kd(self.parts[0](ids.to(device)), target, labels, kd, V)
                sums += torch.stack([r.total_sum.detach(), r.kd_sum.detach(), r.ce_sum.detach()]).double()
                (r.total_sum * (lay.dp / n_global)).backward()
        if self.grad_sync is not None:
            self.grad_sync([p for part in self.parts for p in part.parameters()])
        for o in self.opts:
            o.step()
            o.zero_grad(set_to_none=True)
        for k, v in _fsdp_bytes(self.parts, lay, n, compute_dtype(self.plan)).items():
            self.counter.add(k, v)
        return sums


def train(plan: Plan, inputs: RunInputs, *, steps: int, resume: bool, progress: bool = True,
          dump_grads: str | None = None, elastic=None, watchdog=None) -> tuple[list[RankStats], int, int]:
    """Train up to step ``steps`` (from the latest checkpoint of ``inputs.run_dir`` when
    ``resume``); returns every rank's stats (on every rank), the step training started from and
    the step it ended at (no steps: nothing returned but the start, when it is at or past ``steps``).
    ``elastic`` (executor.faults.Elastic) records attempts and fires injected faults; a restarted
    attempt runs to the end step of the first. ``watchdog`` (executor.faults.Watchdog) is told
    of every step and checkpoint so that a rank that stops answering ends the run.
    Students one after another (capability.students_one_after_another): ``_one_after_another``."""
    if students_one_after_another(plan):
        return _one_after_another(plan, inputs, steps=steps, resume=resume, progress=progress,
                                  dump_grads=dump_grads, elastic=elastic, watchdog=watchdog)
    return _train(plan, inputs, steps=steps, resume=resume, progress=progress, dump_grads=dump_grads,
                  elastic=elastic, watchdog=watchdog)


def student_plan(plan: Plan, k: int) -> Plan:
    """Student ``k`` of a plan whose students run one after another, as its own offline run: its
    own step plan (layout, micro-batch, ZeRO) with the plan's teacher, KD settings, seed and data
    (Plan.student_alone), so its targets come from the same cache (the same cache key: one
    vocabulary, capability.one_after_another_unsupported) and its data order is the same."""
    return plan.student_alone(k)


def _one_after_another(plan: Plan, inputs: RunInputs, *, steps: int, resume: bool, progress: bool,
                       dump_grads: str | None, elastic, watchdog) -> tuple[list[RankStats], int, int]:
    """Students one after another in one run: the teacher pass writes the cache with ``student``'s
    plan (every rank a teacher stage, as an offline run of it alone), the teacher is freed, then
    each student in plan order trains all its steps on all the ranks with its own step plan: its
    own meshes, parallelisation, optimizer and micro-batches (``_train`` of ``student_plan``), each
    reading the cache. The previous student's model, optimizer and gradients are freed before the
    next is built (collected; on GPUs its cached blocks returned, torch.cuda.empty_cache, and the peak
    statistics reset so that each student's peak is its own); its process groups stay (torch keeps
    a DeviceMesh's groups for the process's lifetime). Student k > 0 checkpoints under ``run_dir / extra_students<k-1>``; a resumed run
    resumes each student from its own latest checkpoint (a finished one is not retrained: its
    report entry is then empty). Returns every rank's stats merged: per student in
    RankStats.students, per step index summed over the students."""
    if elastic is not None:  # launch.main refuses it first, in one line
        raise RuntimeError("elastic restarts (--max-restarts, --inject-kill/--inject-hang) are not run for students"
                           " one after another: run each student's plan on its own (kdplan plan --student NAME)")
    n = len(plan.students)
    per: list[list[RankStats] | None] = []
    spans: list[tuple[int, int]] = []
    need_pass = True  # the teacher pass runs before the first student that trains (a resumed run re-checks it)
    for k in range(n):
        sub = student_plan(plan, k)
        sub_inputs = inputs if k == 0 else dataclasses.replace(
            inputs, student_checkpoint=None, checkpoint_dir=inputs.run_dir / f"extra_students{k - 1}")
        if watchdog is not None:
            watchdog.pause()
        got, s, e = _train(sub, sub_inputs, steps=steps, resume=resume, progress=progress,
                           dump_grads=str(Path(dump_grads) / f"student{k}") if dump_grads and k else dump_grads,
                           elastic=None, watchdog=watchdog, teacher_pass=need_pass, final=k == n - 1)
        if e > s:
            need_pass = False
        spans.append((s, e))
        per.append(got or None)
        _release(_device(plan))
    ran = [(s, e) for s, e in spans if e > s]
    if not ran:  # every student already at or past ``steps``
        return [], spans[0][0], spans[0][0]
    return _merge(plan, per), min(s for s, _ in ran), max(e for _, e in ran)


def _release(device: torch.device) -> None:
    """The previous student's tensors, freed (collected), and on a GPU its cached blocks returned."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the next student's peak is its own (the run's: their max)


def _merge(plan: Plan, per: list[list[RankStats] | None]) -> list[RankStats]:
    """One RankStats per rank for a run of students one after another: each student's steps,
    bytes and losses in ``students`` (plan order; a student a resumed run did not retrain has none),
    the run's per step index summed over the students (the time and traffic of every student's
    step i), ``student``'s losses as the run's, the peaks over the students, the teacher pass's
    cache writes."""
    ran = next(p for p in per if p)
    out = []
    for r in range(len(ran)):
        mine = [p[r] if p else None for p in per]
        first = next(x for x in mine if x is not None)
        merged = RankStats(r, first.role)
        for st, x in zip(plan.students, mine):
            one = StudentStats(st.source)
            if x is not None:
                one.step_times_s, one.bytes, one.losses = list(x.step_times_s), dict(x.bytes), list(x.losses)
            merged.students.append(one)
        done = [x for x in mine if x is not None]
        n = min(len(x.step_times_s) for x in done)
        merged.step_times_s = [sum(x.step_times_s[i] for x in done) for i in range(n)]
        merged.wait_s = [sum(x.wait_s[i] for x in done) for i in range(n)]
        for x in done:
            for kind, v in x.bytes.items():
                merged.bytes[kind] = merged.bytes.get(kind, 0.0) + v
        merged.losses = list(mine[0].losses) if mine[0] is not None else []
        merged.peak_memory_gib = max(x.peak_memory_gib for x in done)
        merged.teacher_weights_gib = max(x.teacher_weights_gib for x in done)
        busy = sum(x.busy * sum(x.step_times_s) for x in done)
        merged.busy = busy / max(sum(sum(x.step_times_s) for x in done), 1e-9)
        merged.cache_write_bytes = sum(x.cache_write_bytes for x in done)
        out.append(merged)
    return out


def _train(plan: Plan, inputs: RunInputs, *, steps: int, resume: bool, progress: bool = True,
           dump_grads: str | None = None, elastic=None, watchdog=None, teacher_pass: bool = True,
           final: bool = True) -> tuple[list[RankStats], int, int]:
    """``train`` of one run (one student, or several in turn within each step). ``teacher_pass``
    False (offline, a later student one after another): the cache is already written, no teacher
    is built; ``final`` False: the watchdog keeps watching after it (another student follows)."""
    rank = dist.get_rank()
    device = _device(plan)
    dtype = compute_dtype(plan)
    torch.manual_seed(plan.run.seed)
    tmesh, smesh = build_meshes(plan, rank, device.type)
    teacher_ranks, student_ranks = role_ranks(plan)
    student_group = dist.new_group(student_ranks)  # checkpoint coordination without the teacher ranks
    # every communicator this rank will use, created now, in one order on every rank (NCCL creates
    # them lazily otherwise, and a pair created inside a step can deadlock against a collective)
    warm_up(plan, tmesh, smesh, student_group, device)
    memory = PeakMemory(device)
    memory.sample()  # CUDA context and NCCL communicators exist now
    if watchdog is not None:
        watchdog.arm(student_ranks)
    counter = ByteCounter()
    data = Data(inputs.rows, plan)
    layout = plan.student.layout
    V = plan.student.model.vocab_size
    kd = plan.kd

    runner = None
    if tmesh is not None and tmesh.member and (teacher_pass or kd.mode != "offline"):
        runner = build_teacher(plan, tmesh, inputs, device, counter)
    teacher_gib = stored_bytes(runner.stage) / GIB if runner is not None else 0.0
    targets = None
    if tmesh is not None:
        cached = kd.mode == "offline" or writes_cache_online(plan)
        key = cache_key(plan, inputs.teacher_key) if cached else ""
        cache = cache_dir(inputs.out_dir / "teacher_outputs", key) if cached else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        targets = Targets(plan, tmesh=tmesh, smesh=smesh, runner=runner, microbatch=data.microbatch,
                          n_micro=data.n_micro, vocab_size=V, counter=counter, cache_dir=cache, cache_key=key)

    start = _resume_step(inputs.run_dir, rank) if resume else 0
    end = steps
    if elastic is not None:
        end = elastic.begin(start, end)
        dist.barrier()  # attempt 0's end step is on disk before any rank can fail
    if start >= end:
        return [], start, start
    steps = end - start
    stats = RankStats(rank, "student" if smesh.member else "teacher", teacher_weights_gib=teacher_gib)

    if targets is not None and kd.mode == "offline":
        if teacher_pass:
            _offline_pass(targets, start, steps, data, rank)
        counter.reset()
        # training reads the cache: the teacher's weights are freed before the students are built
        # (the device then holds the students only, several of them side by side with extra_students)
        targets.runner = runner = None
    elif targets is not None and writes_cache_online(plan):
        _plan_cache(targets, start, steps, data, rank)

    if not smesh.member:  # disaggregated teacher rank (no watchdog: it only waits on the students)
        with StepTimer(device) as whole:
            targets.teacher_loop(start, steps)
        stats.step_times_s = [whole.elapsed_s / max(steps, 1)] * steps
        stats.busy = max(0.0, 1.0 - targets.idle_s / max(whole.elapsed_s, 1e-9))
        stats.bytes = {k: v / max(steps, 1) for k, v in counter.as_dict().items()}
        stats.peak_memory_gib = memory.peak_gib()
        return _finish(stats), start, end

    # several students (plan.extra_students): each counts its own bytes; the teacher's stay in ``counter``
    scounter = ByteCounter() if plan.extra_students else counter
    parts, stage_ids, opts = build_student(plan, smesh, inputs, device, scounter)
    cos = [CoStudent(plan, k, smesh, inputs, device) for k in range(len(plan.extra_students))]
    clock = SpanClock(device) if cos or targets is not None else None
    if cos:
        stats.students = [StudentStats(plan.student.source)] + [c.stats for c in cos]
    # what a checkpoint holds: every student's stages (co-students under keys of their own)
    ck_parts = parts + [p for c in cos for p in c.parts]
    ck_opts = opts + [o for c in cos for o in c.opts]
    ck_ids = list(stage_ids) + [i for c in cos for i in c.stage_ids]
    if resume and start > 0:
        ckpt.load(inputs.run_dir, start, ck_parts, ck_opts, ck_ids, group=student_group)
    n_stages = layout.pp * layout.virtual_stages
    is_last_stage = (n_stages - 1) in stage_ids
    pp = layout.pp > 1
    out = {}

    def loss_fn(logits, idx):
        if out.get("skip", 0):  # the pipeline's shape inference runs fwd/bwd once on empty inputs
            out["skip"] -= 1
            return logits.float().sum() * 0.0
        m = int(idx.reshape(-1)[0])
        step = out["step"]
        _, labels = data.microbatch(step, smesh.dp_rank, m)[:2]
        target = targets.get(step, m) if targets is not None else None
        r = _kd(logits, target, labels, kd, V)
        out["sums"] += torch.stack([r.total_sum.detach(), r.kd_sum.detach(), r.ce_sum.detach()]).double()
        return r.total_sum * (layout.dp / out["n_global"])

    grad_sync = (GradSync(smesh.group("dp"), grad_compression=layout.grad_compression, counter=scounter)
                 if needs_grad_sync(layout) else None)
    sched = None
    if pp:
        sched = build_schedule(parts, stage_ids, layout, pp_group=smesh.group("pp"), device=device,
                               n_microbatches=data.n_micro, loss_fn=loss_fn)
    # bf16 autocast over the fp32 master weights (FSDP2 already gathers bf16: autocast is then a no-op)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    tp_bytes = SampledCommBytes(layout.tp > 1 or (runner is not None and tmesh.tp > 1), start, steps)
    bar = _progress(progress and rank == _reporter(smesh), steps)

    for step in range(start, end):
        if watchdog is not None:
            watchdog.beat(step)
        if elastic is not None:
            elastic.at_step(step)
        with StepTimer(device) as timer:  # the device is synchronised at both ends of the step
            if targets is not None:
                targets.wait_s = 0.0
            out.update(step=step, n_global=data.global_valid_tokens(step),
                       sums=torch.zeros(3, dtype=torch.float64, device=device))
            with tp_bytes.at(step), autocast:
                if clock is not None:
                    clock.mark()
                if targets is not None and kd.mode == "online" and kd.placement == "colocated":
                    targets.teacher_phase(step)
                    if watchdog is not None:
                        watchdog.mark()
                if cos and targets is not None:
                    # several students read the same targets: read them (offline: from the cache) and
                    # compute the teacher's side of the loss once per batch, in the teacher's span
                    targets.fetch_all(step)
                    targets.prepare(step)
                if clock is not None:
                    clock.mark()
                if pp:
                    _pp_step(sched, data, step, smesh, stage_ids, n_stages, out, device)
                else:
                    for m in range(data.n_micro):
                        if targets is not None:
                            targets.prefetch(step, m)
                        ids, _, _ = data.microbatch(step, smesh.dp_rank, m)
                        with _grad_sync_ctx(parts[0], m == data.n_micro - 1, keep_gathered=0 < layout.zero < 3):
                            logits = parts[0](ids.to(device))
                            # the micro-batch index stays on the host: loss_fn reads it with int()
                            loss_fn(logits, torch.tensor([m], device="cpu")).backward()
                        if watchdog is not None:
                            watchdog.mark()  # how far into the step: names the rank that stopped first
                if grad_sync is not None:
                    grad_sync([p for part in parts for p in part.parameters()])
                if dump_grads and step == start:
                    _dump_grads(parts, Path(dump_grads) / f"rank{rank}.pt")
                for o in opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
                if watchdog is not None:
                    watchdog.mark()
                for k, v in _fsdp_bytes(parts, layout, data.n_micro, dtype).items():
                    scounter.add(k, v)
                co_sums = []
                if clock is not None:
                    clock.mark()
                for c in cos:  # the other students, from the same teacher targets (one forward)
                    co_sums.append(c.step(step, smesh, targets, data, out["n_global"], device))
                    if dump_grads and step == start:
                        _dump_grads(c.parts, Path(dump_grads) / c.key / f"rank{rank}.pt")
                    clock.mark()
                    if watchdog is not None:
                        watchdog.mark()
            if pp:
                _count_pp_bytes(scounter, parts, stage_ids, n_stages, data, plan, smesh)
            if is_last_stage:
                sums = torch.stack([out["sums"], *co_sums]) if co_sums else out["sums"]
                if layout.dp > 1:
                    dist.all_reduce(sums, group=smesh.group("dp"))
                rows = (sums / out["n_global"]).reshape(-1, 3).tolist()
                stats.losses.append((step, *rows[0]))
                for st, row in zip(stats.students, rows):
                    st.losses.append((step, *row))
            if targets is not None:
                targets.done(step)
                if targets.online_steps is not None and step == targets.last_online_step:
                    # online_then_cache: the teacher's last online step; later steps read the cache
                    # (the device then holds the student alone, as in the offline epochs priced)
                    targets.runner = runner = None
        stats.step_times_s.append(timer.elapsed_s)
        if clock is not None:  # the device was synchronised at the end of the step
            teacher_s, *each = clock.spans_s()
            stats.teacher_s.append(teacher_s)
            for st, t in zip(stats.students, each):
                st.step_times_s.append(t)
        stats.wait_s.append(targets.wait_s if targets is not None else 0.0)
        if ckpt.due(plan, step + 1):
            if watchdog is not None:
                watchdog.extend()  # the save gets a full timeout of its own
            ckpt.save(inputs.run_dir, step + 1, ck_parts, ck_opts, ck_ids, group=student_group, rank=rank,
                      fault=(lambda: elastic.at_step(step, "save")) if elastic is not None else None)
        if elastic is not None:
            elastic.completed(step + 1)
        if bar is not None:
            bar.update(step, stats)

    if bar is not None:
        bar.close()
    if targets is not None and targets.writer is not None:
        _finish_cache(targets, rank)
    if watchdog is not None and final:
        watchdog.stop()  # the final gather waits for the slowest rank, under the collective timeout
    timed = stats.step_times_s[WARMUP_STEPS:] or stats.step_times_s
    waits = stats.wait_s[WARMUP_STEPS:] or stats.wait_s
    stats.busy = max(0.0, 1.0 - sum(waits) / max(sum(timed), 1e-9))
    stats.bytes = {k: v / max(steps, 1) for k, v in counter.as_dict().items()}
    for st, c in zip(stats.students, [scounter] + [c.counter for c in cos]):
        st.bytes = {k: v / max(steps, 1) for k, v in c.as_dict().items()}
        for k, v in st.bytes.items():  # the whole step's bytes: the teacher's and every student's
            stats.bytes[k] = stats.bytes.get(k, 0.0) + v
    for k, v in tp_bytes.per_step().items():
        stats.bytes[k] = stats.bytes.get(k, 0.0) + v
    stats.peak_memory_gib = memory.peak_gib()
    stats.cache_write_bytes = float(targets.cache_write_bytes) if targets is not None else 0.0
    return _finish(stats), start, end


def _resume_step(run_dir: Path, rank: int) -> int:
    """Latest intact checkpoint, chosen (and checksummed) once by rank 0 and shared with all."""
    box = [ckpt.latest_step(run_dir, say=lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else 0]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _dump_grads(parts, path: Path) -> None:
    """Full (unsharded, dp-averaged) gradients by HF name; a collective for DTensor grads."""
    from .models import param_key
    grads = {}
    for part in parts:
        for name, p in part.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            if g is not None:
                grads[param_key(name)] = g.detach().cpu().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(grads, path)


def _kd(logits, target, labels, kd, V):
    """The student's loss of one micro-batch as training runs it (executor.bench measures this very
    function): with a teacher, the target's teacher side prepared once (kd.losses.prepare_target;
    a no-op for the targets of a run with several students, prepared once per batch in the teacher
    phase), then the KD loss; without one (plain training), the CE alone."""
    labels = labels.reshape(-1).to(logits.device)
    if target is None:
        return kd_loss(logits.reshape(-1, V), None, labels, alpha=0.0)
    target = prepare_target(target.to(logits.device), temperature=kd.temperature, vocab_size=V,
                            dtype=loss_dtype(logits))
    return kd_loss(logits.reshape(-1, V), target, labels, loss=kd.loss, temperature=kd.temperature, alpha=kd.alpha,
                   beta=kd.beta)


def _pp_step(sched, data: Data, step: int, smesh: RoleMesh, stage_ids, n_stages: int, out: dict, device) -> None:
    ids = data.shard(step, smesh.dp_rank)[0].to(device)
    # torch.distributed.pipelining infers shapes on its first step by running forward/backward
    # (and the loss) once on uninitialised inputs; that loss call must not count (private flag).
    ready = getattr(sched, "_stage_backward_initialized", None) or getattr(sched, "_stages_backward_initialized", False)
    out["skip"] = 0 if ready else 1
    args = (ids,) if 0 in stage_ids else ()
    kwargs = {}
    if n_stages - 1 in stage_ids:
        # micro-batch indices, read on the host by loss_fn
        kwargs = {"target": torch.arange(data.n_micro, device="cpu").view(-1, 1), "losses": []}
    sched.step(*args, **kwargs)


def _count_pp_bytes(counter, parts, stage_ids, n_stages, data, plan, smesh) -> None:
    """Activations forward and their gradients backward (compute dtype), per micro-batch and stage boundary."""
    sp = getattr(parts[0], "sp_degree", 1)
    act = data.mb * plan.job.seq_len // sp * plan.student.model.hidden_size * compute_dtype(plan).itemsize
    for i in stage_ids:
        sends = (i < n_stages - 1) + (i > 0)
        counter.add("pipeline", act * sends * data.n_micro)


def _offline_pass(targets: Targets, start: int, steps: int, data: Data, rank: int) -> None:
    """Offline KD: the teacher pass before training (every rank holds a teacher stage), then one
    line saying what it wrote and what it found in the cache."""
    counts = torch.tensor(targets.offline_pass(start, steps, data), dtype=torch.int64, device=targets.device)
    dist.all_reduce(counts)
    if rank == 0:
        print(f"teacher-output cache {targets.cache_dir}: {int(counts[0])} samples written, {int(counts[1])}"
              " found cached (checked)", file=sys.stderr, flush=True)


def _plan_cache(targets: Targets, start: int, steps: int, data: Data, rank: int) -> None:
    """online_then_cache: which steps run the teacher online and write the cache (Targets.plan_cache),
    then one line saying how many samples will be written and how many were found cached."""
    counts = torch.tensor(targets.plan_cache(start, steps, data), dtype=torch.int64, device=targets.device)
    dist.all_reduce(counts)
    if rank == 0:
        print(f"teacher-output cache {targets.cache_dir}: {int(counts[0])} samples to write online over"
              f" {len(targets.online_steps)} steps, {int(counts[1])} found cached (checked)", file=sys.stderr,
              flush=True)


def _finish_cache(targets: Targets, rank: int) -> None:
    """online_then_cache, end of the run: every rank's pending files written, then one line."""
    written = torch.tensor([targets.finish_cache()], dtype=torch.int64, device=targets.device)
    dist.all_reduce(written)
    if rank == 0:
        print(f"teacher-output cache {targets.cache_dir}: {int(written[0])} samples written online",
              file=sys.stderr, flush=True)


def _reporter(smesh: RoleMesh) -> int:
    return smesh.rank_at(smesh.pp - 1, 0, 0)


def _finish(stats: RankStats) -> list[RankStats]:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stats)
    return everyone


class _progress:
    """rich progress bar with the latest loss (rank that knows the loss only)."""

    def __new__(cls, enabled: bool, steps: int):
        if not enabled or os.environ.get("KDPLAN_NO_PROGRESS"):
            return None
        return super().__new__(cls)

    def __init__(self, enabled: bool, steps: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        self.p = Progress(TextColumn("[bold]distil"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.task = self.p.add_task("steps", total=steps, info="")
        self.p.start()

    def update(self, step: int, stats: RankStats) -> None:
        info = f"loss {stats.losses[-1][1]:.4f}" if stats.losses else ""
        self.p.update(self.task, advance=1, info=f"{info}  {stats.step_times_s[-1] * 1e3:.0f} ms/step")

    def close(self) -> None:
        self.p.stop()
