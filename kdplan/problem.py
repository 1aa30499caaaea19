"""The resolved planning problem: what the cost model, the search and the simulator take.

``Problem`` holds everything resolved (``kdplan.jobs.resolve`` builds it from a job file and
flags): nothing left as a string that could still be wrong. ``ProblemCache`` is the memo of the
prices and layouts computed for one problem's inputs.

This module sits below the cost model, the search and the simulator: it imports only the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schema.cluster import ClusterProfile
from .schema.job import JobSpec
from .schema.model import ModelSpec
from .schema.plan import Baselines


@dataclass(eq=False)
class ProblemCache:
    """Prices and layouts computed for one problem's inputs; owned by the planner.

    Key: the problem's ``(cluster, job, student, teacher)`` objects by identity (``inputs_of``).
    ``valid_for`` empties the cache when a problem's inputs are no longer those objects (one of
    them was replaced in place), so nothing stale is read. Pins are not in the key: the cost
    model never reads them, and the layout lists below carry the pins in their own keys.

    A new ``Problem`` (also ``dataclasses.replace`` of one) starts with an empty cache.
    ``planner.Planner`` owns the sharing: it hands problems that differ only in their pins the
    same cache, and problems that differ only in GPU count the same ``prices``. The cost model
    and the search fill it; nothing else writes to it.

    - ``prices``: the cost model's memo (kdplan.cost.role): role prices keyed on the role, its
      layout key and placement, layer times keyed ``("layer", model, id(model), gpu, b, tp, ...)``;
    - ``baselines``: the problem's three baselines (kdplan.cost.baselines);
    - ``layouts``: the search's valid layouts (search.space.Space.options), keyed on the role,
      its GPU count and groups, the memory floor, the role's pins and the teacher precisions.
    """

    inputs: tuple = ()
    prices: dict = field(default_factory=dict)
    baselines: Baselines | None = None
    layouts: dict = field(default_factory=dict)

    @staticmethod
    def inputs_of(problem: Problem) -> tuple[int, int, int, int]:
        return (id(problem.cluster), id(problem.job), id(problem.student), id(problem.teacher))

    def valid_for(self, problem: Problem) -> ProblemCache:
        """This cache, emptied first if it was filled for other inputs."""
        key = self.inputs_of(problem)
        if self.inputs != key:
            self.inputs, self.prices, self.baselines, self.layouts = key, {}, None, {}
        return self


@dataclass
class Problem:
    """A fully resolved planning problem."""

    job: JobSpec
    teacher: ModelSpec | None
    student: ModelSpec
    cluster: ClusterProfile
    pins: dict[str, Any] = field(default_factory=dict)
    """Typed ``--fix`` values by key (kdplan.pins.PIN_KEYS)."""
    job_path: str | None = None
    teacher_precisions: tuple[str, ...] = ("bf16",)
    """Teacher forward precisions the solver may choose (teacher_precision.allowed_teacher_precisions)."""
    students: tuple[ModelSpec, ...] = ()
    """Every student of a whole job (job.students, resolved; the first is ``student``); empty
    when the job names one student."""
    kd_vocab_size: int | None = None
    """Token ids [0, V) the KD loss compares over (models.kd_vocab_size); the student's table
    when not given (no teacher, or a Problem built by hand)."""
    kd_signal: str = "logits"
    """What the student learns from (schema.job.KDSignal): "logits", or "sequence" (sequence-level
    KD: the teacher generates text once, the student trains on it with cross-entropy; chosen by
    kdplan.jobs.resolve for different tokenizers or a kd.signal pin)."""
    kd_signal_reason: str | None = None
    """Why the signal is "sequence" (None for logits)."""
    teacher_pass_apart: bool = False
    """Offline KD's teacher pass is planned apart, once for the whole job on GPUs other than this
    problem's (kdplan.search.job: students side by side on groups of the job's GPUs read one cache
    written by one pass on all of them): the step plan lays out and prices the student reading the
    cache only, and its prediction.offline.teacher_pass_s_per_step is 0."""
    cache: ProblemCache = field(default_factory=ProblemCache, init=False, repr=False, compare=False)
    """Prices and layouts for these inputs (``ProblemCache``); read through ``memo()``."""

    def __post_init__(self) -> None:
        if self.kd_vocab_size is None:
            self.kd_vocab_size = self.student.vocab_size

    def memo(self) -> ProblemCache:
        """The cache, valid for this problem's current inputs."""
        return self.cache.valid_for(self)

    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus
