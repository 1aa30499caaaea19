"""Job spec (TOML): what to distil, where, and the constraints on how."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .common import SCHEMA_VERSION, Strict, Versioned
from .compression import CompressionField

Precision = Literal["bf16", "fp16", "fp32"]
Recompute = Literal["none", "selective", "full"]
KDMode = Literal["online", "offline"]
KDSignal = Literal["logits", "sequence"]
Placement = Literal["colocated", "disaggregated"]
KDLoss = Literal["forward_kl", "reverse_kl", "jsd"]
Objective = Literal["time", "cost"]
TeacherPrecision = Literal["bf16", "fp8", "int8", "auto"]
StudentPrecision = Literal["job", "fp8"]


class KDSettings(Strict):
    """Distillation settings the user chooses (the solver may choose mode/placement/compression)."""

    loss: KDLoss = "forward_kl"
    """Divergence between teacher and student distributions."""
    temperature: float = Field(default=1.0, gt=0, le=1000)
    """Softmax temperature tau; the KD term is scaled by tau^2."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the KD term; (1 - alpha) weighs cross-entropy on labels."""
    beta: float = Field(default=0.5, ge=0, le=1)
    """Generalised JSD beta (normalised: 0 -> forward KL, 1 -> reverse KL)."""
    min_topk: int | None = Field(default=None, ge=1, le=10_000_000)
    """Fidelity floor: never send fewer than this many teacher logits per token."""
    allowed_compressions: list[CompressionField] | None = None
    """Restrict teacher-output compression to these (e.g. ["dense", "topk:64:bf16"])."""
    min_fidelity: float | None = Field(default=None, gt=0, le=1)
    """Ask for quality instead of a format: the teacher-output formats eligible are those whose
    measured share of dense KD's gain (``fidelity_curve``, the lower end of its 95% interval) is
    at least this; formats without a measurement are not eligible (dense always is)."""
    fidelity_curve: str | None = None
    """The measured fidelity curve --min-fidelity reads (benchmarks/compression_quality.py --write);
    default profiles/fidelity/tiny-cpu.json."""
    hidden_state_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    """Also distil hidden states projected to this many dimensions (None: logits only)."""
    prompt_ratio: float = Field(default=0.2, ge=0, le=1000)
    """Sequence-level KD (kd.signal = "sequence"): prompt tokens per token the teacher generates.
    Each training sequence of seq_len tokens is a prompt of seq_len * r / (1 + r) tokens and the
    teacher's continuation of seq_len / (1 + r). Default 0.2: an assumption, not a measurement
    (reasoning-trace distillation data are long answers to short prompts)."""


class SolverSettings(Strict):
    """How the ILP is solved."""

    objective: Objective = "time"
    """Minimise step time, or dollars per token."""
    solver: Literal["highs", "cbc"] = "highs"
    """MILP solver (HiGHS via highspy; CBC bundled with PuLP is the fallback)."""
    time_limit_s: float = Field(default=60.0, gt=0, le=86400)
    """Wall-clock limit for the solver."""
    mip_gap: float = Field(default=0.0, ge=0, le=1)
    """Relative optimality gap at which the solver may stop."""
    top_k_alternatives: int = Field(default=3, ge=0, le=100)
    """How many next-best alternatives to report."""
    runnable: bool = False
    """Only layouts and features `kdplan run` executes (kdplan.schema.capability); a job that needs
    one it does not (sequence-level KD, fp16, hidden-state KD, ...) is then infeasible (exit 3).
    Same as `kdplan plan --runnable`."""


class RunSettings(Strict):
    """What the executor needs beyond the layout: data, tokenizer, checkpoints, optimiser."""

    data: str | None = None
    """Text file, JSONL file, or a HF dataset saved to disk (None: the built-in sample corpus)."""
    tokenizer: str | None = None
    """Local tokenizer directory (None: train a BPE tokenizer of `vocab_size` on the data)."""
    teacher_checkpoint: str | None = None
    """Local HF checkpoint directory (safetensors) for the teacher (None: pretrain briefly)."""
    student_checkpoint: str | None = None
    """Local HF checkpoint directory for the student (None: random init)."""
    teacher_pretrain_steps: int = Field(default=300, ge=0, le=10_000_000)
    """When no teacher checkpoint is given: steps to pre-train the teacher so it carries signal."""
    steps: int = Field(default=20, ge=1, le=100_000_000)
    """Optimizer steps."""
    lr: float = Field(default=3e-3, gt=0, le=10)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    """AdamW weight decay."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed for init, data order and dropout."""
    checkpoint_every: int = Field(default=0, ge=0, le=100_000_000)
    """Write a checkpoint every N steps (0: never)."""
    output_dir: str = "runs/latest"
    """Where checkpoints, caches and reports go."""


class JobSpec(Versioned):
    """A distillation job: teacher, student, cluster, batch, and constraints."""

    file_kind: ClassVar[str] = "job"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    teacher: str | None = "gpt-13b"
    """Teacher preset name or path to a HF config.json; "none" or null plans plain training."""
    student: str = "gpt-1.3b"
    """Student preset name or path to a HF config.json."""
    cluster: str = "dgx-a100-80g"
    """Cluster preset name or path to a cluster YAML."""
    gpus: int | None = Field(default=None, ge=1, le=1_000_000)
    """Total GPUs to use (nodes = gpus / gpus per node); None: the whole cluster preset."""
    seq_len: int = Field(default=2048, ge=1, le=10_000_000)
    """Tokens per sequence."""
    global_batch: int = Field(default=512, ge=1, le=100_000_000)
    """Sequences per optimizer step."""
    precision: Precision = "bf16"
    """Compute precision of weights and activations."""
    teacher_precision: TeacherPrecision = "bf16"
    """Teacher forward precision. "bf16": the exact teacher at the job's precision (default);
    "fp8" / "int8": quantize the teacher's block weights per output channel and run its GEMMs on
    the low-precision tensor cores (fp8: H100/H200; int8: A100, H100, H200), a fidelity trade;
    "auto": let the solver choose among bf16 and what the hardware supports (it quantizes only
    when that gains more than the 1% tie tolerance). Same as --teacher-precision."""
    student_precision: StudentPrecision = "job"
    """Precision of the students' GEMMs in training. "job": the job's precision (default). "fp8":
    Transformer Engine style fp8 training of every student (fp8 GEMMs forward and backward, bf16
    master weights and optimizer; plan field student.layout.train_precision): only on GPUs with fp8
    tensor cores (H100/H200/H800) and a bf16 job; changes the training numerics, so it is never
    chosen unless asked for. `kdplan run` refuses such a plan (kdplan.schema.capability). Same as
    --student-precision."""
    tokens: float | None = Field(default=None, gt=0, le=1e18)
    """Token budget of each student's distillation (for hours and dollars, and the whole-job plan
    in prediction.job)."""
    students: list[str] | None = Field(default=None, min_length=1, max_length=16)
    """Several students distilled from the one teacher in one job (presets or HF config.json
    paths); the first is the one `student` the step plan is made for. None: just `student`.
    Same as repeating --student."""
    dataset_tokens: float | None = Field(default=None, gt=0, le=1e18)
    """Unique tokens of the corpus: epochs = tokens / dataset_tokens (None: tokens, one epoch).
    Same as --dataset-tokens."""
    kd: KDSettings = KDSettings()
    """Distillation settings."""
    fix: dict[str, str] = {}
    """Pinned layout keys (same keys as --fix), e.g. {"student.tp" = "2"}."""
    solver: SolverSettings = SolverSettings()
    """Solver settings."""
    run: RunSettings = RunSettings()
    """Executor settings."""
