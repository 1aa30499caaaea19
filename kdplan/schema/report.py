"""Run report: what the executor measured, next to what the plan predicted."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from .common import SCHEMA_VERSION, Strict, Versioned
from .plan import Prediction


class PlanRef(Strict):
    """The plan a run executed."""

    path: str
    """Path of the plan file as given to `kdplan run`."""
    sha256: str
    """Hash of the plan file's bytes."""


class LossPoint(Strict):
    """Loss terms of one optimizer step (token-weighted means over the global batch)."""

    step: int = Field(ge=0)
    """Step index (0-based)."""
    total: float
    """alpha * kd + (1 - alpha) * ce."""
    kd: float | None = None
    """Distillation term (true KL, not the cross-entropy form)."""
    ce: float
    """Cross-entropy on labels."""


class Restart(Strict):
    """One elastic restart."""

    at_utc: str
    """When the failure was observed."""
    rank: int | None = None
    """Rank that died (if known)."""
    resumed_from_step: int
    """Checkpoint step the job resumed from."""
    steps_redone: int = 0
    """Steps computed twice because of the failure."""


class StudentMeasured(Strict):
    """One student of a run that trains several (plan.student, then plan.extra_students)."""

    student: str
    """The student's source (RolePlan.source)."""
    step_time_s: float = Field(ge=0)
    """Median after warm-up of its part of the step (its micro-batches, gradient sync and
    optimizer step; the slowest rank's), the shared teacher phase excluded; students one after
    another: its own whole step (reading the cache included)."""
    step_times_s: list[float] = []
    """Its part of every step."""
    bytes_per_step: dict[str, float] = {}
    """Bytes sent per step for this student, by kind (gradients, params, pipeline; summed over
    ranks). The teacher's bytes and sampled tensor-parallel bytes are in Measured.bytes_per_step only."""
    loss: list[LossPoint] = []
    """Its per-step loss terms."""


class Measured(Strict):
    """Measurements of a run."""

    step_time_s: float = Field(ge=0)
    """Median step time after warm-up."""
    step_times_s: list[float] = []
    """Every step's wall time (rank 0)."""
    tokens_per_s: float = Field(ge=0)
    """Training tokens per second for the whole job."""
    utilization: float = Field(ge=0, le=1)
    """Busy fraction averaged over ranks."""
    utilization_per_rank: list[float] = []
    """Busy fraction of each rank."""
    peak_memory_gib: float = Field(ge=0)
    """Maximum over ranks (CUDA max allocated, or RSS on CPU)."""
    peak_memory_per_rank_gib: list[float] = []
    """Per rank."""
    bytes_per_step: dict[str, float] = {}
    """Bytes sent per step by kind: teacher_outputs, gradients, tensor_parallel, pipeline."""
    teacher_wait_s: float = Field(default=0.0, ge=0)
    """Median time per step the student ranks waited for teacher outputs."""
    teacher_weights_gib: float = Field(default=0.0, ge=0)
    """Teacher parameters and buffers resident on the fullest teacher rank, as stored: 2 B per weight
    in bf16, 1 B per block Linear weight + fp32 scales for an fp8 / int8 teacher; its shard under
    teacher zero = 3; without the streamed blocks under weight offload (0 without a teacher)."""
    loss: list[LossPoint] = []
    """Per-step loss terms."""
    cache_write_bytes: float = Field(default=0.0, ge=0)
    """Bytes of teacher outputs this run wrote to the teacher-output cache, summed over ranks: the
    payloads (the kd.compression format's tensors) of the offline teacher pass before training, or
    of online_then_cache's online steps; once per run, not per step (so not in bytes_per_step).
    0 when nothing was written (no cache, or every sample found cached)."""
    teacher_phase_s: float | None = None
    """Several students: median after warm-up of the step's teacher phase, the one forward every
    student's targets come from (offline: the read of the step's cached targets), with the
    teacher's side of the KD loss computed once for all students (the slowest rank's); None for
    one student."""
    students: list[StudentMeasured] = []
    """Several students (plan.extra_students): each one's step share, bytes and losses, plan order
    (``student`` first; its losses are also ``loss``). Empty for one student. Students one after
    another (capability.students_one_after_another): each student's own steps, times and bytes;
    step_times_s / bytes_per_step are then per step index summed over the students (the run's
    time and traffic for every student's step i), and teacher_phase_s is None (the teacher pass
    runs once, before training)."""
    eval: dict[str, float] = {}
    """Held-out metrics (e.g. student_loss, kl_to_teacher) when evaluated."""


class RunReport(Versioned):
    """What `kdplan run` writes."""

    file_kind: ClassVar[str] = "run report"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    plan: PlanRef
    """The plan it ran."""
    baseline: str | None = None
    """None for the plan itself, or naive-dp / single / mirror."""
    world_size: int = Field(ge=1)
    """Processes."""
    device: str
    """cpu (gloo) or cuda device name."""
    torch_version: str = ""
    """torch version."""
    steps: int = Field(ge=0)
    """Optimizer steps run."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps excluded from the median."""
    measured: Measured
    """Measurements."""
    predicted: Prediction | None = None
    """The plan's prediction block, copied."""
    restarts: list[Restart] = []
    """Elastic restarts during the run."""
    layout_summary: str = ""
    """One line describing what ran."""
