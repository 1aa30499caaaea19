"""The contract between the cost model (kdplan/cost), the simulator (kdplan/sim) and the solver
(kdplan/search). Data only: the implementations live in the modules named below.

Vocabulary (one name per concept):
- a *Layout* (kdplan.schema.Layout) is one role's split: tp, pp, dp, zero, micro_batch,
  recompute, sequence_parallel, virtual_stages, schedule, offload, grad_compression, num_gpus;
- a *Candidate* is a whole KD configuration: student layout, teacher layout (or None),
  mode (online|offline), placement (colocated|disaggregated), teacher-output compression, and
  which cluster group(s) each role runs on;
- a *RolePrice* is what one role costs per optimizer step on its GPUs;
- a *TransferPrice* is what moving teacher outputs to the student costs per step.

Composition rules (implemented in kdplan.cost.evaluate, mirrored linearly by the ILP):
- colocated online:  step = teacher.time_s + student.time_s + transfer.exposed_s (0: local);
                     memory per GPU = teacher.memory_gib + student.memory_gib
- disaggregated:     step = max(teacher.time_s, student.time_s) + transfer.exposed_s;
                     the two groups' memories are separate
- offline:           step = student.time_s + transfer.exposed_s (reading cached outputs);
                     the one-off teacher pass is reported in Prediction.offline
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schema.compression import Compression
from ..schema.plan import Layout


@dataclass(frozen=True)
class Candidate:
    """One full configuration the solver may choose."""

    student: Layout
    teacher: Layout | None
    mode: str = "online"  # online | offline
    placement: str = "colocated"  # colocated | disaggregated
    compression: Compression = Compression("dense")
    student_group: int = 0  # index into cluster.groups (mixed clusters)
    teacher_group: int = 0
    student_stage_layers: tuple[int, ...] | None = None  # uneven pipeline split (layers per stage)
    student_stage_groups: tuple[int, ...] | None = None  # cluster group of each stage (mixed clusters)


@dataclass
class StageTime:
    """Per pipeline stage, per micro-batch: what the simulator replays."""

    forward_s: float
    backward_s: float  # 0 for the teacher (forward only)
    p2p_s: float = 0.0  # send of activations to the next stage (per micro-batch, per direction)
    memory_gib: float = 0.0


@dataclass
class RolePrice:
    """What one role costs per optimizer step (the whole global batch) on its GPUs."""

    role: str  # "teacher" | "student"
    time_s: float  # busy + exposed comm + bubble for the global batch
    compute_s: float  # pure compute time on the critical path
    bubble_s: float  # pipeline bubble
    comm_exposed_s: dict[str, float] = field(default_factory=dict)  # by kind
    memory_gib: float = 0.0  # maximum over this role's GPUs
    memory_terms_gib: dict[str, float] = field(default_factory=dict)  # of the fullest GPU
    fullest_stage: int = 0
    bytes_per_step: dict[str, float] = field(default_factory=dict)  # by kind, summed over GPUs
    model_flops: float = 0.0  # per step, without recomputation
    num_micro_batches: int = 1  # per pipeline per step
    stages: list[StageTime] = field(default_factory=list)
    optimizer_s: float = 0.0
    fits: bool = True
    why: str = ""  # when it does not fit: which term on which stage
    offload_s: float = 0.0  # exposed host<->GPU streaming (included in time_s)


@dataclass
class TransferPrice:
    """Teacher outputs travelling to the student (or read from storage when offline)."""

    bytes_per_step: float
    time_s: float  # total link time per step
    exposed_s: float  # the part not hidden behind compute
    bytes_per_token: float
