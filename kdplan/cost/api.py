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

Composition rules (implemented in kdplan.cost.compose / evaluate, mirrored by the ILP):
- colocated online:  step = student.time_s + colocated_teacher_s(student, teacher)
                     + transfer.exposed_s (0: local). The teacher's forward of each micro-batch
                     runs inside the student's forward slot on the same GPUs, so it lengthens
                     every slot of the student's pipeline, the fill and drain included: with the
                     student's m micro-batches, p stages and v chunks, per-stage teacher time T
                     per student micro-batch adds T * (m + (p - 1) / v) (stage-wise when the
                     teacher has the student's pipeline depth, the mirror layout; else every GPU
                     carries the teacher's slowest stage, T = teacher.steady_time_s / m).
                     For the mirror layout with equal micro-batches this equals teacher.time_s
                     (its own bubble is the extra (p - 1) slots); for any other layout the
                     solver must use colocated_teacher_s, not teacher.time_s.
                     memory per GPU = teacher.memory_gib + student.memory_gib
- disaggregated:     step = max(teacher.steady_time_s, student.time_s) + transfer.exposed_s.
                     The teacher streams micro-batches without flushing between steps, so its
                     pipeline fill is paid once, not per step: the solver should use
                     teacher.steady_time_s (= time_s - bubble_s) for a disaggregated teacher;
                     the two groups' memories are separate
- offline:           step = student.time_s + transfer.exposed_s (reading cached outputs);
                     the one-off teacher pass is reported in Prediction.offline

Pipeline sends are priced exposed on every micro-batch (in the stage times): the executors
modelled (Megatron-LM / Megatron-DeepSpeed 1F1B, as in the validation runs) exchange activations
and gradients with blocking send/recv pairs between compute steps. The simulator replays the
same (sends block the sender's stream). Pricing only the fill/drain sends (fully overlapped p2p)
was measured worse on the development set: BLOOM Kendall tau of the NHEADS sweep 0.80 -> 0.60.
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

    forward_s: float  # compute + tensor-parallel collectives + this stage's sends (training: half)
    backward_s: float  # 0 for the teacher (forward only); the other half of the sends
    p2p_s: float = 0.0  # ONE send of activations (or gradients) to the neighbour stage
    memory_gib: float = 0.0
    # The same time, taken apart (per micro-batch, all v chunks of the stage together):
    busy_forward_s: float = 0.0  # forward without sends (compute + tensor-parallel collectives)
    busy_backward_s: float = 0.0  # backward without sends
    tp_s: float = 0.0  # tensor-parallel collectives inside busy_forward_s + busy_backward_s
    sends: int = 0  # sends per micro-batch (forward_s + backward_s include sends * p2p_s)
    params_s: float = 0.0  # exposed ZeRO-3 parameter gathers
    offload_s: float = 0.0  # exposed host->GPU weight streaming
    grad_reduce_s: float = 0.0  # per STEP: the whole data-parallel gradient reduction (not only exposed)
    loss_s: float = 0.0  # the loss over the vocabulary (memory bound), inside busy_backward_s
    # (training) or busy_forward_s (the teacher's top-k selection); last stage only

    @property
    def per_micro_batch_s(self) -> float:
        """What one micro-batch occupies this stage: the slot of the pipeline formula."""
        return self.forward_s + self.backward_s + self.params_s + self.offload_s


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
    loss_s: float = 0.0  # the loss over the vocabulary on the critical path (included in compute_s)
    framework_s: float = 0.0  # fixed framework costs on the critical path (kdplan.cost.overhead; in compute_s)

    @property
    def steady_time_s(self) -> float:
        """Per step without the pipeline fill: what a role costs when it streams micro-batches
        without flushing between steps (a disaggregated teacher; see the composition rules)."""
        return self.time_s - self.bubble_s


@dataclass
class TransferPrice:
    """Teacher outputs travelling to the student (or read from storage when offline)."""

    bytes_per_step: float
    time_s: float  # total link time per step
    exposed_s: float  # the part not hidden behind compute
    bytes_per_token: float
