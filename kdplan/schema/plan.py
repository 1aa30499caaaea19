"""The plan: what the solver chose and what the cost model predicts for it.

This is the contract between the planner and the executor (design.md section 3); the executor
reads this file and nothing else from the planner. A golden file in tests/ freezes its JSON
Schema: change it deliberately and bump SCHEMA_VERSION.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_serializer, model_validator

from .common import SCHEMA_VERSION, Strict, Versioned
from .compression import CompressionField, parse_compression, sampled_loss_error
from .job import KDLoss, KDMode, KDSignal, Objective, Placement, Precision, Recompute, RunSettings
from .model import ModelSpec

Offload = Literal["none", "weights", "optimizer"]
GradCompression = Literal["none", "int8"]
ForwardPrecision = Literal["bf16", "fp8", "int8"]
TrainPrecision = Literal["job", "fp8"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]


class Stage(Strict):
    """One pipeline stage: a contiguous layer range and the global ranks that run it."""

    first_layer: int = Field(ge=0)
    """First transformer block (0-based, inclusive)."""
    last_layer: int = Field(ge=0)
    """Last transformer block (exclusive)."""
    ranks: list[int] = []
    """Global ranks of this stage (tp x dp x cp of them)."""
    gpu: str | None = None
    """GPU type these ranks run on (mixed clusters)."""


class Layout(Strict):
    """How one model (teacher or student) is split across its GPUs."""

    tp: int = Field(default=1, ge=1, le=1_000_000)
    """Tensor-parallel degree."""
    pp: int = Field(default=1, ge=1, le=1_000_000)
    """Pipeline-parallel degree."""
    dp: int = Field(default=1, ge=1, le=1_000_000)
    """Data-parallel degree."""
    cp: int = Field(default=1, ge=1, le=1_000_000)
    """Context-parallel degree (ring attention): each sequence is split over ``cp`` ranks (zigzag:
    2*cp chunks, rank i holding chunks i and 2*cp-1-i, so causal attention work is balanced), each
    rank runs its blocks on its s/cp tokens, and K/V blocks travel around the ring of cp ranks
    (tp ranks apart) inside every attention. The cp ranks hold the same weights, so gradients are
    reduced and ZeRO states sharded over dp*cp ranks. Rank order (pp, dp, cp, tp), tp innermost.
    1: no context parallelism (what every plan before schema 1.8 means)."""
    ep: int = Field(default=1, ge=1, le=1_000_000)
    """Expert-parallel degree (a mixture-of-experts teacher only; 1 everywhere else): the dp
    ranks form groups of ``ep`` consecutive dp ranks (``tp`` global ranks apart), each rank of a
    group holds ``num_experts / ep`` of every MoE block's routed experts, and the group exchanges
    the routed tokens by two all-to-alls per MoE block (dispatch, combine). Attention, dense
    blocks, shared experts and routers stay data-parallel (or tensor-parallel) as without it.
    Divides dp and the model's num_experts."""
    zero: int = Field(default=0, ge=0, le=3)
    """ZeRO stage over the data-parallel group (3 = FSDP full sharding)."""
    shard_group: int | None = Field(default=None, ge=1, le=1_000_000)
    """Data-parallel ranks one ZeRO shard spans (None: the whole dp group). Smaller than dp:
    hybrid sharding (HSDP; FSDP2 ``fully_shard(mesh=(replicate, shard))``): the states are
    sharded over groups of ``shard_group`` consecutive dp ranks (one node's GPUs, typically)
    and replicated across the dp / shard_group such groups, whose gradient shards are
    all-reduced. Needs zero >= 1 and must divide dp."""
    micro_batch: int = Field(default=1, ge=1, le=1_000_000)
    """Sequences per micro-batch."""
    recompute: Recompute = "none"
    """Activation recomputation."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards norms/dropout over tp)."""
    virtual_stages: int = Field(default=1, ge=1, le=1024)
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule."""
    offload: Offload = "none"
    """What lives in host memory and streams over PCIe."""
    grad_compression: GradCompression = "none"
    """Gradient all-reduce payload: full precision or 8-bit with error feedback."""
    forward_precision: ForwardPrecision = "bf16"
    """Precision of the matmuls of this role's forward pass. "bf16": not quantized (the job's
    compute precision, the exact teacher). "fp8" (e4m3) / "int8" (teacher only: it runs forward
    only): the Linear weights of the transformer blocks are quantized per output channel
    (symmetric absmax, one fp32 scale per output channel; 1 byte per weight) and, on GPUs, their
    GEMMs run on the fp8 / int8 tensor cores (the cost model prices them at the profile's
    fp8_tflops / int8_tops times low_precision_derating); embeddings, the LM head, norms and the
    attention core stay at the job's precision. A fidelity trade like top-k compression: the
    teacher's outputs change slightly (benchmarks/compression_quality.py measures the KL)."""
    train_precision: TrainPrecision = "job"
    """Precision of a trained role's (the student's) GEMMs. "job": the job's precision (what every
    plan before schema 1.9 means). "fp8": Transformer Engine style fp8 training (opted into with
    --student-precision fp8; only on GPUs with fp8 tensor cores): the Linear GEMMs of the blocks
    run forward and backward on the fp8 tensor cores (e4m3 inputs and weights, e5m2 gradients,
    delayed per-tensor scaling from an amax history) while the master weights, gradients and
    optimizer states stay as in bf16 mixed precision; embeddings, the LM head, norms, the attention
    core and the loss stay at the job's precision. Memory: an fp8 copy of each block Linear weight
    and its transpose (2 B per weight, cached across the micro-batches of a step) and the GEMM
    inputs saved for the weight gradient in fp8 (1 B). Gradient / parameter collectives are
    unchanged (bf16/fp32). The forward-only teacher keeps "job" (its own low-precision forward is
    forward_precision). Changes numerics: a fidelity trade the user opts into."""
    num_gpus: int = Field(default=1, ge=1, le=1_000_000)
    """GPUs this role owns (tp * pp * dp * cp)."""
    stages: list[Stage] = []
    """Layer ranges per pipeline stage."""
    ranks: list[int] = []
    """Global ranks of this role, in (pp, dp, cp, tp) order with tp innermost."""

    @model_validator(mode="after")
    def _check(self) -> "Layout":
        if self.gpus != self.num_gpus:
            raise ValueError(
                f"tp*pp*dp*cp = {self.tp}*{self.pp}*{self.dp}*{self.cp} = {self.gpus}"
                f" but num_gpus = {self.num_gpus}"
            )
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide dp={self.dp}: expert-parallel groups are "
                             "made of data-parallel ranks")
        if self.stages and len(self.stages) != self.pp * self.virtual_stages:
            raise ValueError(
                f"{len(self.stages)} stages listed but pp*virtual_stages = {self.pp * self.virtual_stages}"
            )
        if self.ranks and len(self.ranks) != self.num_gpus:
            raise ValueError(f"{len(self.ranks)} ranks listed but num_gpus = {self.num_gpus}")
        if self.shard_group is not None:
            if self.zero < 1:
                raise ValueError(f"shard_group = {self.shard_group} needs zero >= 1 (nothing is sharded at zero 0)")
            if self.dp % self.shard_group:
                raise ValueError(f"shard_group = {self.shard_group} does not divide dp = {self.dp}")
        return self

    @property
    def gpus(self) -> int:
        """GPUs the degrees span: tp * pp * dp * cp (``num_gpus`` must equal it)."""
        return self.tp * self.pp * self.dp * self.cp

    @property
    def stage_gpus(self) -> int:
        """GPUs of one pipeline stage: tp * dp * cp."""
        return self.tp * self.dp * self.cp

    @property
    def state_shards(self) -> int:
        """Ranks one ZeRO shard of the model states spans: the shard group's dp ranks times cp
        (context-parallel ranks hold the same weights, so the states shard over them too)."""
        return self.shard * self.cp

    @property
    def shard(self) -> int:
        """Data-parallel ranks a ZeRO shard spans: ``shard_group``, else the whole dp group."""
        return self.shard_group or self.dp

    @property
    def replicas(self) -> int:
        """Copies of each ZeRO shard across the dp group (1 unless hybrid sharding)."""
        return self.dp // self.shard


def expert_parallel_error(model: ModelSpec | None, lay: Layout | None, role: str) -> str | None:
    """Why ``lay.ep`` cannot split ``model``'s experts (None when it can): ep > 1 needs a
    mixture-of-experts model whose routed experts ep divides. The one rule the plan, the pins
    and the cost model share."""
    if model is None or lay is None or lay.ep == 1:
        return None
    if model.moe is None:
        return f"{role}.layout.ep = {lay.ep}: {model.name} is a dense model (no experts to split)"
    if model.moe.num_experts % lay.ep:
        return (f"{role}.layout.ep = {lay.ep} does not divide {model.name}'s {model.moe.num_experts} "
                "routed experts")
    return None


def context_parallel_error(seq_len: int | None, lay: Layout | None, role: str) -> str | None:
    """Why ``lay.cp`` cannot split sequences of ``seq_len`` tokens (None when it can): the zigzag
    split cuts each sequence into 2*cp equal chunks. The one rule the plan, the pins and the cost
    model share."""
    if lay is None or lay.cp == 1 or seq_len is None:
        return None
    if seq_len % (2 * lay.cp):
        return (f"{role}.layout.cp = {lay.cp}: ring attention's zigzag split cuts each sequence into 2*cp = "
                f"{2 * lay.cp} equal chunks, which sequence length {seq_len} does not divide into")
    return None


class RolePlan(Strict):
    """One model's part of the plan."""

    source: str
    """Preset name or config path the model came from."""
    model: ModelSpec
    """The model's shape (inlined so the executor needs nothing else)."""
    layout: Layout
    """How it is split."""


class KDPlan(Strict):
    """How the teacher signal is produced, carried and used."""

    signal: KDSignal = "logits"
    """What the student learns from. "logits": the teacher's output distribution, token by token
    (the fields below say how it travels and which divergence compares it). "sequence":
    sequence-level KD (Kim & Rush 2016; the DeepSeek-R1 -> Qwen/Llama distillations): the teacher
    generates text once, offline (teacher.layout is its generation layout,
    prediction.generation its cost), and the student trains with plain cross-entropy on that text
    in its own tokenizer; loss, temperature, compression and vocab_size then carry no meaning
    (alpha is 0: no KD term). The planner chooses it when teacher and student have different
    tokenizers (``signal_reason`` says why), or when pinned (--fix kd.signal=sequence)."""
    signal_reason: str | None = None
    """Why the plan distils at sequence level (None for logit KD)."""
    mode: KDMode = "online"
    """Teacher runs during training (online) or its outputs were precomputed (offline)."""
    placement: Placement = "colocated"
    """Teacher on the student's GPUs, or on its own group streaming to the student."""
    loss: KDLoss = "forward_kl"
    """Divergence."""
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """KD weight; 1 - alpha weighs cross-entropy."""
    beta: float = Field(default=0.5, ge=0, le=1)
    """Normalised generalised-JSD beta."""
    compression: CompressionField = Field(default="dense", validate_default=True)
    """Teacher-output format: dense | topk:K | topk:K:BITS (bits 16, 8 or 4)."""
    compression_reason: str | None = None
    """Why the planner chose this format (it takes the most faithful one within its 1% tie
    tolerance of the fastest plan); None when it did not choose (no teacher)."""
    hidden_state_dim: int | None = None
    """Projected hidden-state distillation width (None: off)."""
    vocab_size: int | None = Field(default=None, ge=1, le=10_000_000)
    """Token ids [0, vocab_size) the KD loss compares over: the tokenizer teacher and student share
    (models.kd_vocab_size). Each model computes its own full, possibly padded, output projection;
    KD slices both to these ids. None without a teacher."""
    max_in_flight: int = Field(default=2, ge=1, le=1024)
    """Disaggregated: how many micro-batches the teacher may run ahead of the student."""
    teacher_precision_reason: str | None = None
    """Why the teacher runs at teacher.layout.forward_precision (pinned, the only precision the
    job allows, or what a quantized teacher gains or would gain); None without a teacher."""

    @model_validator(mode="after")
    def _sampled_target_loss(self) -> "KDPlan":
        if why := sampled_loss_error(self.compression, self.loss):
            raise ValueError(why)
        return self


class BaselinePrediction(Strict):
    """The cost model's prediction for one baseline layout (design.md section 4)."""

    step_time_s: float | None = None
    """Predicted step time; None where the baseline cannot run."""
    comm_bytes_per_step: float | None = None
    """Bytes crossing device-to-device links per step (as Prediction.comm_bytes_per_step: host
    offload traffic excluded)."""
    utilization: float | None = None
    """Busy fraction averaged over GPUs."""
    memory_per_gpu_gib: float | None = None
    """Fullest GPU."""
    reason: str | None = None
    """Why it cannot run (e.g. out of memory), when step_time_s is None."""
    description: str = ""
    """The layout this baseline stands for."""
    student: Layout | None = None
    """The student layout the prediction is for (None where the baseline cannot run). `kdplan run
    --baseline` runs exactly this layout, with the teacher co-located online and dense outputs."""
    teacher: Layout | None = None
    """The teacher layout the prediction is for (None without a teacher or where it cannot run)."""

    def as_prediction(self, tokens_per_step: int) -> "Prediction | None":
        """This baseline's numbers as a plan prediction (what a baseline run's report carries);
        None where the baseline cannot run."""
        if self.step_time_s is None or self.step_time_s <= 0:
            return None
        return Prediction(step_time_s=self.step_time_s, tokens_per_s=tokens_per_step / self.step_time_s, mfu=0.0,
                          memory_per_gpu_gib=self.memory_per_gpu_gib or 0.0,
                          comm_bytes_per_step=self.comm_bytes_per_step or 0.0,
                          utilization=min(1.0, self.utilization or 0.0))


BASELINE_FIELDS = {"single": "single_gpu", "naive-dp": "naive_dp", "mirror": "mirror"}
"""`kdplan run --baseline NAME` -> the field of ``Baselines`` it runs (one spelling each)."""


class Baselines(Strict):
    """The three baselines every speedup is measured against (priced, and their layouts chosen,
    by kdplan.cost.baselines)."""

    single_gpu: BaselinePrediction = BaselinePrediction()
    """Teacher and student on one GPU (teacher offloaded if it does not fit)."""
    naive_dp: BaselinePrediction = BaselinePrediction()
    """Full teacher and student replicas on every GPU, DDP, fp32 gradients, dense logits."""
    mirror: BaselinePrediction = BaselinePrediction()
    """Teacher co-located with the student's own TP/PP layout (ModelOpt-style)."""

    def named(self, name: str) -> BaselinePrediction:
        """The baseline `--baseline NAME` runs (single | naive-dp | mirror)."""
        return getattr(self, BASELINE_FIELDS[name])


class MemoryBreakdown(Strict):
    """Memory of the fullest GPU, by term, in GiB."""

    gpu_rank: int = 0
    """Global rank of the fullest GPU."""
    role: str = "student"
    """Which role(s) live on it."""
    terms_gib: dict[str, float] = {}
    """Weights, gradients, optimizer, activations, teacher weights, KD buffers, overhead..."""
    largest_term: str = ""
    """Name of the largest term."""
    limit_gib: float = 0.0
    """Device memory of that GPU."""


class OfflineCost(Strict):
    """One-off costs of offline KD."""

    teacher_pass_s_per_step: float = 0.0
    """Teacher time to precompute one step's worth of outputs (on all GPUs)."""
    storage_bytes_per_token: float = 0.0
    """Bytes stored per token at the chosen compression."""


class GenerationCost(Strict):
    """Sequence-level KD's one-off teacher pass: the teacher generates the training text on all
    the job's GPUs before the student trains (priced by kdplan.cost.generation; every assumption
    is named there). Per training sequence of seq_len tokens: a prompt of seq_len * r / (1 + r)
    tokens (prefilled) and seq_len / (1 + r) generated tokens (decoded), r = prompt_ratio."""

    teacher_pass_s_per_step: float = Field(ge=0)
    """Teacher time to generate one optimizer step's worth of training tokens (global_batch x
    seq_len) with all its replicas."""
    prefill_s_per_token: float = Field(ge=0)
    """One replica's time per prompt token (compute bound: active FLOPs at the profile's
    achieved fraction of peak)."""
    decode_s_per_token: float = Field(ge=0)
    """One replica's time per generated token, amortised over the decode batch: a decode round
    (every sequence in flight advances one token) divided by the sequences in flight."""
    decode_round_s: float = Field(ge=0)
    """One decode round on one replica: max(bytes read / achieved HBM bandwidth, FLOPs / achieved
    peak) per pipeline micro-batch x pipeline stages, plus the tensor-parallel all-reduces."""
    decode_bound: Literal["memory", "compute"] = "memory"
    """What bounds a decode round: reading weights and KV cache, or the matmuls."""
    decode_batch: int = Field(ge=1)
    """Sequences in flight per replica (all pipeline micro-batches): the most that fit beside the
    weights with their KV cache, up to kdplan.cost.generation.MAX_DECODE_BATCH."""
    prompt_ratio: float = Field(ge=0)
    """Prompt tokens per generated token (job kd.prompt_ratio)."""
    mean_context_tokens: float = Field(ge=0)
    """Average tokens a decoded token attends to (prompt + half the generated length)."""
    kv_cache_bytes_per_token: float = Field(ge=0)
    """KV-cache bytes per token over all layers, before any tensor-parallel split."""
    memory_per_gpu_gib: float = Field(ge=0)
    """The teacher's fullest GPU while it generates (weights, KV cache, runtime)."""
    storage_bytes_per_token: float = Field(default=4.0, ge=0)
    """Bytes stored per training token: one int32 token id (the text, retokenized for the student)."""


class JobPhase(Strict):
    """One stretch of the whole job's timeline (prediction.job.timeline)."""

    name: str
    """What runs: "teacher pass", "<student> epoch 1", "<student>", ..."""
    start_s: float = Field(ge=0)
    """When it starts, from the start of the job."""
    duration_s: float = Field(ge=0)
    """How long it runs."""
    gpus: int = Field(ge=0)
    """GPUs it occupies."""
    detail: str = ""
    """One line: step time, steps, what is read or written."""


class StudentJob(Strict):
    """One student's part of the whole job."""

    student: str
    """Preset name or config path."""
    step_time_s: float = Field(ge=0)
    """Its step time in the chosen strategy (reading the cache when offline; for the fanned-out
    online strategy, its share of the shared step; for disaggregated_fanout, its own step on its
    group, while the job runs at the slowest of the teacher, the transfer and every student, as
    prediction.job.timeline shows)."""
    steps: float = Field(ge=0)
    """Optimizer steps (tokens / (global_batch * seq_len))."""
    gpus: int = Field(default=0, ge=0)
    """GPUs it trains on (all the job's GPUs one after another, or its own group side by side)."""
    mirror_step_time_s: float | None = None
    """Its mirror-KD step time (the separate-mirror baseline), None where mirror cannot run."""


class JobBaseline(Strict):
    """A whole-job baseline (design.md section 4)."""

    total_time_s: float | None = None
    """Predicted wall time of the whole job; None where it cannot run."""
    reason: str | None = None
    """Why it cannot run, when total_time_s is None."""


class JobBaselines(Strict):
    """Whole-job baselines."""

    separate_mirror: JobBaseline = JobBaseline()
    """Every student as its own mirror-KD job, one after another, the teacher recomputed for
    every student and every epoch."""


class JobPrediction(Strict):
    """The whole distillation job (every student, every epoch), chosen by kdplan.search.job and
    priced by kdplan.cost.job from the step plans of each phase."""

    strategy: Literal["offline", "online_fanout", "disaggregated_fanout", "separate_online", "sequence",
                      "online_then_cache"]
    """sequence: sequence-level KD, the teacher generates the training text once (token ids
    stored), every student and epoch trains on it with cross-entropy;
    offline: one teacher pass writes a cache, every student and epoch reads it;
    online_then_cache: a student's first epoch runs the teacher online (co-located) and writes
    the cache as it trains, its later epochs and the other students read it; online_fanout:
    the teacher runs once per batch on the students' GPUs and feeds every student;
    disaggregated_fanout: the teacher runs once per batch on its own GPUs (teacher_gpus) and
    streams its outputs to every student, the students side by side on their own GPUs;
    separate_online: each student its own kdplan step plan, one after another, the teacher
    recomputed each time."""
    reason: str = ""
    """Why this strategy won, and what the others would take."""
    students_arrangement: Literal["one_after_another", "side_by_side", "in_turn_each_step"] = "one_after_another"
    """How the students share the GPUs: one after another (each on all the job's GPUs),
    side by side (each on its own disjoint group, students[].gpus), or in turn within every step
    on the same GPUs, in one run (online_fanout; offline with plan.extra_students)."""
    arrangement_reason: str = ""
    """Why that arrangement: the best job of the other arrangement, or why it could not run."""
    teacher_gpus: int | None = None
    """GPUs of the teacher's own group (disaggregated_fanout); None where it shares the students'."""
    total_time_s: float = Field(ge=0)
    """Wall time of the whole job, teacher pass and cache traffic included."""
    cost_usd: float | None = None
    """Dollars for the whole job at the profile's price per GPU-hour (None: no price)."""
    cache_bytes: float = Field(default=0.0, ge=0)
    """Bytes of teacher outputs written to storage (0 unless offline or online_then_cache)."""
    cache_format: CompressionField | None = None
    """Format of the cached teacher outputs (offline, online_then_cache), a kd.compression format."""
    cache_storage: str | None = None
    """The storage tier holding the cache (offline, online_then_cache)."""
    teacher_passes: float = Field(ge=0)
    """How many times the teacher runs over each unique token."""
    dataset_tokens: float = Field(gt=0)
    """Unique tokens (the corpus)."""
    tokens_per_student: float = Field(gt=0)
    """Token budget of each student."""
    epochs: float = Field(gt=0)
    """tokens_per_student / dataset_tokens."""
    students: list[StudentJob] = []
    """Per-student step times and steps."""
    timeline: list[JobPhase] = []
    """The job as a timeline a person can read."""
    rejected: list[str] = []
    """Strategies that could not run, and what binds."""
    baselines: JobBaselines = JobBaselines()
    """Whole-job baselines."""
    speedup_vs_separate_mirror: float | None = None
    """baselines.separate_mirror.total_time_s / total_time_s."""


class Prediction(Strict):
    """What the cost model predicts for this plan (design.md section 3)."""

    step_time_s: float = Field(ge=0)
    """Time per optimizer step."""
    tokens_per_s: float = Field(ge=0)
    """Training tokens processed per second by the whole job."""
    mfu: float = Field(ge=0)
    """Model FLOPs utilisation: student train + teacher forward model FLOPs (no recompute)
    / (step time * GPUs * dense peak)."""
    memory_per_gpu_gib: float = Field(ge=0)
    """Maximum over GPUs."""
    comm_bytes_per_step: float = Field(ge=0)
    """Bytes sent over device-to-device links per step, summed over GPUs: tensor- and
    pipeline-parallel activations, gradient reduction, ZeRO parameter gathers, teacher outputs.
    Host offload traffic (PCIe weight streaming, optimizer offload) is excluded: it is reported in
    bytes_per_step["offload"]. Baselines count the same way, so comm_reduction_vs_naive_dp
    compares network traffic with network traffic."""
    utilization: float = Field(ge=0, le=1)
    """Busy (compute) fraction averaged over GPUs."""
    breakdown_s: dict[str, float] = {}
    """Step time by component: compute, loss (the loss over the vocabulary: memory-bound CE/KD
    passes), exposed comm by kind, bubble, teacher_wait, offload."""
    bytes_per_step: dict[str, float] = {}
    """Bytes per step by kind: teacher_outputs, gradients, tensor_parallel, pipeline, params, offload."""
    memory: MemoryBreakdown = MemoryBreakdown()
    """The fullest GPU and what fills it."""
    memory_per_role_gib: dict[str, float] = {}
    """Maximum per-GPU memory per role."""
    idle_s: dict[str, float] = {}
    """Idle time per step per role (e.g. the faster side of a disaggregated split)."""
    offline: OfflineCost | None = None
    """Offline KD's one-off teacher pass and storage."""
    generation: GenerationCost | None = None
    """Sequence-level KD's one-off teacher generation (kd.signal = "sequence"); the step time
    and the rest of this block are then the student's cross-entropy step alone."""
    baselines: Baselines = Baselines()
    """The baselines of design.md section 4, from the same cost model."""
    speedup_vs_single_gpu: float | None = None
    """baselines.single_gpu.step_time_s / step_time_s."""
    speedup_vs_mirror: float | None = None
    """baselines.mirror.step_time_s / step_time_s."""
    comm_reduction_vs_naive_dp: float | None = None
    """1 - comm_bytes_per_step / baselines.naive_dp.comm_bytes_per_step."""
    cost_per_million_tokens_usd: float | None = None
    """Dollars per million tokens at the profile's price per GPU-hour."""
    job: JobPrediction | None = None
    """The whole job (all students, all epochs, the cache), when the job has a token budget
    (--tokens) and a teacher; None otherwise."""


class SolverInfo(Strict):
    """Which solver chose the plan and how sure it is."""

    name: str = "none"
    """Solver that ran (highs, cbc, enumeration, fixed)."""
    status: str = "not_run"
    """optimal (proven within solver.mip_gap) | time_limit (the solver stopped at [solver]
    time_limit_s with a layout in hand: planned, not proven optimal; ``gap`` says how far it may
    be) | fixed (every key pinned: a pure simulation) | not_run. A limit reached before any
    layout is an error (exit 1), and a proven "nothing fits" is Infeasible (exit 3): neither
    writes a plan."""
    solve_time_s: float = 0.0
    """Wall time of the solve."""
    num_candidates: int = 0
    """Candidate (layout x placement x compression) combinations considered."""
    objective: Objective = "time"
    """What was minimised."""
    gap: float | None = None
    """Proven relative optimality gap, when the solver reports one."""


class Alternative(Strict):
    """A runner-up plan, for `kdplan plan --top K` and `kdplan inspect`."""

    summary: str
    """One line describing the layout."""
    step_time_s: float
    """Its predicted step time."""
    memory_per_gpu_gib: float
    """Its fullest GPU."""


class JobSummary(Strict):
    """The resolved inputs the plan was made for."""

    cluster: str
    """Cluster preset name or path."""
    gpus: int = Field(ge=1, le=1_000_000)
    """GPUs used (the job's bound)."""
    gpus_per_node: int = Field(ge=1, le=1_000_000)
    """GPUs per node."""
    gpu_types: list[str] = []
    """GPU type of each group."""
    device_kind: Literal["gpu", "cpu"] = "gpu"
    """cuda GPUs or CPU processes (gloo)."""
    seq_len: int = Field(ge=1, le=10_000_000)
    """Tokens per sequence."""
    global_batch: int = Field(ge=1, le=100_000_000)
    """Sequences per optimizer step."""
    precision: Precision = "bf16"
    """Compute precision."""
    tokens: float | None = Field(default=None, gt=0, le=1e18)
    """Token budget."""
    dataset_tokens: float | None = Field(default=None, gt=0, le=1e18)
    """Unique tokens of the corpus the run cycles over (the job's --dataset-tokens): the executor
    trains on the first dataset_tokens / seq_len sequences of the data, rounded down to whole
    global batches, every epoch visiting each once (None: all the data)."""


class ExecutorCheck(Strict):
    """Whether `kdplan run` executes the plan, decided by the planner from the executor's declared
    limits (kdplan.schema.capability, the table executor/launch.py refuses from)."""

    runnable: bool
    """True when the executor runs every feature of the plan (the launch still checks the world
    size, the device and the files the plan names)."""
    unsupported: list[str] = []
    """Each feature it does not run, in one line: the plan field and value, why, and what to
    re-plan with (kdplan plan --runnable leaves such layouts out). The executor refuses the first."""


class Plan(Versioned):
    """A complete plan: layouts, KD settings, prediction and provenance."""

    file_kind: ClassVar[str] = "plan"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    kdplan_version: str = ""
    """Version of kdplan that wrote it."""
    created_utc: str = ""
    """ISO timestamp."""
    job: JobSummary
    """Resolved inputs."""
    teacher: RolePlan | None = None
    """Teacher (None: plain training of the student)."""
    student: RolePlan
    """Student."""
    extra_students: list[RolePlan] = []
    """Further students of the same teacher, trained in the same run as ``student``; how depends
    on prediction.job.students_arrangement (kdplan.schema.capability):

    - in turn within each step (in_turn_each_step, or no whole-job prediction): one teacher
      forward per batch (online_fanout) or one read of each batch's cached targets (offline), then
      each student in plan order (``student`` first) runs its own micro-batches, gradient sync and
      optimizer step with its own model, optimizer and layout, on ``student``'s ranks, tp and dp
      (one student mesh; each has its own ZeRO / micro-batch);
    - one after another (one_after_another, strategy offline): one teacher pass writes the cache
      (with ``student``'s plan), then ``student`` trains all its steps, then each extra student
      all its steps with its own step plan (any tp / pp / dp / ZeRO / micro-batch on the run's
      ranks, a fresh mesh each), reading the cache.

    Empty (and left out of the JSON) for a one-student plan."""
    kd: KDPlan = KDPlan()
    """Distillation settings."""
    prediction: Prediction
    """Cost-model prediction."""
    solver: SolverInfo = SolverInfo()
    """How the plan was chosen."""
    alternatives: list[Alternative] = []
    """Next-best plans."""
    run: RunSettings = RunSettings()
    """Executor settings copied from the job."""
    world_size: int = Field(default=1, ge=1)
    """Processes the executor must be launched with."""
    executor: ExecutorCheck | None = None
    """Whether `kdplan run` can execute this plan, and what it would refuse (None: not checked,
    a plan written before schema 1.6; the executor checks every plan itself)."""

    def baseline(self, name: str) -> "Plan":
        """The plan of baseline ``name`` (single | naive-dp | mirror; design.md section 4): the
        student and teacher layouts the cost model chose and priced for it, the teacher co-located
        online with dense outputs, and the baseline's own prediction. ValueError where the
        baseline cannot run."""
        b = self.prediction.baselines.named(name)
        if b.student is None or (self.teacher is not None and b.teacher is None):
            raise ValueError(f"the plan's {name} baseline cannot run"
                             f" ({b.reason or 'the plan carries no layout for it: re-plan it with this kdplan'})")
        pred = b.as_prediction(self.job.global_batch * self.job.seq_len)
        upd = {"student": self.student.model_copy(update={"layout": b.student}), "world_size": b.student.num_gpus,
               "kd": self.kd.model_copy(update={"mode": "online", "placement": "colocated",
                                                "compression": parse_compression("dense")}),
               "prediction": pred.model_copy(update={"baselines": self.prediction.baselines}),
               "executor": None}  # the parent plan's check is not the baseline's
        if self.teacher is not None:
            upd["teacher"] = self.teacher.model_copy(update={"layout": b.teacher})
        return self.model_copy(update=upd)

    @model_validator(mode="after")
    def _student_exact(self) -> "Plan":
        if why := expert_parallel_error(self.teacher.model if self.teacher else None,
                                        self.teacher.layout if self.teacher else None, "teacher"):
            raise ValueError(why)
        for name, role in [("student", self.student)] + [(f"extra_students[{i}]", r)
                                                         for i, r in enumerate(self.extra_students)]:
            if role.layout.ep != 1:
                raise ValueError(f"{name}.layout.ep = {role.layout.ep}: expert parallelism is planned for "
                                 "the forward-only teacher only (a trained student's experts are sharded by ZeRO)")
            if role.layout.forward_precision != "bf16":
                raise ValueError(f"{name}.layout.forward_precision must be bf16: only the forward-only "
                                 "teacher may be quantized (fp8/int8)")
        if self.teacher is not None and self.teacher.layout.train_precision != "job":
            raise ValueError("teacher.layout.train_precision must be job: the forward-only teacher does not train "
                             "(its low-precision forward is teacher.layout.forward_precision)")
        for name, role in [("student", self.student), ("teacher", self.teacher)] + [
                (f"extra_students[{i}]", r) for i, r in enumerate(self.extra_students)]:
            if role is not None and (why := context_parallel_error(self.job.seq_len, role.layout, name)):
                raise ValueError(why)
        if self.extra_students and self.teacher is None:
            raise ValueError("extra_students share the teacher's forward: a plan without a teacher has one student")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_extra_students(self, handler):
        """A one-student plan's JSON stays as it was before ``extra_students`` existed."""
        data = handler(self)
        if isinstance(data, dict) and not self.extra_students:
            data.pop("extra_students", None)
        return data

    @property
    def students(self) -> list[RolePlan]:
        """Every student the plan trains, in plan order: ``student``, then ``extra_students``."""
        return [self.student, *self.extra_students]

    def student_alone(self, k: int) -> "Plan":
        """Student ``k`` (of ``students``) as a one-student plan: the same teacher, layouts, KD
        settings, seed and data, no extra_students and no whole-job prediction (it is one student's
        run). What a run of several students is compared with (tests, benchmarks/multi_student.py)."""
        pred = self.prediction.model_copy(update={"job": None})
        return self.model_copy(update={"student": self.students[k], "extra_students": [], "prediction": pred})
