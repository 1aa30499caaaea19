"""Hardware and cluster profiles: data with sources, never numbers in code.

A cluster is one or more *groups* of identical nodes (a mixed cluster has several groups, e.g.
16 A100 + 16 H100). Every number that describes hardware carries a ``source``; efficiencies
(achieved fraction of peak compute and of link bandwidth) are data here, fitted by
``kdplan calibrate`` or measured by ``kdplan profile``, never constants in the cost model.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import SCHEMA_VERSION, Strict, Versioned

# The student's loss as GPUSpec.loss_passes keys it: the teacher target's compression kind, or
# "none" (plain training)
LOSS_KINDS = ("none", "dense", "topk", "sample")


# Rates, sizes and fractions below are bounded below by 1e-9 rather than > 0: a subnormal peak or
# bandwidth (1e-320) passed "> 0" and priced every layout at inf (the ILP then raised; found by
# KDPLAN_FUZZ=explore on a hardware YAML).


class PeakCompute(Strict):
    """Dense peak throughput per device, in TFLOP/s (1e12 floating-point operations per second)."""

    bf16_tflops: float = Field(ge=1e-9, le=1e6)
    """Dense bf16 tensor-core peak."""
    fp16_tflops: float = Field(ge=1e-9, le=1e6)
    """Dense fp16 tensor-core peak."""
    fp32_tflops: float = Field(ge=1e-9, le=1e6)
    """Dense fp32 peak (non tensor-core, or TF32 where the framework uses it; say which in source)."""
    fp8_tflops: float | None = Field(default=None, ge=1e-9, le=1e6)
    """Dense FP8 (e4m3/e5m2) tensor-core peak; None where the device has no FP8 tensor cores.
    Only a forward-only teacher is ever priced at it (Layout.forward_precision)."""
    int8_tops: float | None = Field(default=None, ge=1e-9, le=1e6)
    """Dense INT8 tensor-core peak in TOPS (1e12 integer operations per second); None where not
    supported. Only a forward-only teacher is ever priced at it."""
    low_precision_derating: float = Field(default=0.75, ge=1e-9, le=1)
    """Achieved efficiency of an FP8/INT8 GEMM relative to the bf16 efficiency curve at the same
    size: the low-precision GEMM runs at peak_lp * eta_bf16(F) * this. Below 1 because real FP8 /
    INT8 kernels reach a smaller fraction of their (2x) peak than bf16 kernels do, and per-tensor
    casts / scales cost time; the profile's source says where its value comes from."""
    low_precision_source: str = ""
    """Where fp8_tflops / int8_tops and low_precision_derating come from."""


class ComputeEfficiency(Strict):
    """Achieved fraction of peak for a matrix multiply as a function of its size.

    eta(flops) = max_fraction * flops / (flops + half_saturation_gflop * 1e9); the memory-bound
    elementwise work around the matrix multiplies is priced by its bytes at
    ``elementwise_bandwidth_fraction`` of the memory bandwidth. Small or skinny matrices (small
    micro-batches, narrow tensor-parallel shards) therefore run far below peak.
    """

    max_fraction: float = Field(default=0.75, ge=1e-9, le=1)
    """Asymptotic fraction of dense peak that large matrix multiplies reach."""
    half_saturation_gflop: float = Field(default=5.0, ge=0, le=1e9)
    """Size of one matrix multiply (GFLOP) at which it reaches half of max_fraction."""
    min_dim_saturation: int = Field(default=128, ge=1, le=1_000_000)
    """Smallest matrix dimension that still fills the device; narrower dims scale efficiency down."""
    elementwise_bandwidth_fraction: float | None = Field(default=None, gt=0, le=10)
    """Achieved share of the memory bandwidth of a block's fused elementwise kernels (norms,
    activation, residual adds, rotary), whose bytes cost.compute.fused_elementwise_elements counts
    per token: their time grows with the activations (b*s*(h + f)), not with the matmuls' FLOPs,
    so it is ~1% of a 405B block's matmul time and ~8% of a 1B one's on an A100. Above 1 on a
    CPU whose elementwise working set stays in cache. Unset (a profile written before schema 1.11):
    ``elementwise_overhead_fraction`` prices it."""
    elementwise_overhead_fraction: float | None = Field(default=None, ge=0, le=10)
    """The pricing of profiles written before schema 1.11, used only where
    ``elementwise_bandwidth_fraction`` is unset (setting both is refused): the elementwise time as
    a fixed fraction of the block's weight GEMMs' time, 0.1 where neither is set. Replaced because
    a fraction of the FLOPs overprices large models' blocks and underprices small ones'
    (cost.compute.elementwise_s)."""
    attention_fraction: float = Field(default=0.6, ge=1e-9, le=1)
    """Achieved fraction of peak inside the attention core (QK^T, softmax, AV)."""
    op_dispatch_us: float = Field(default=0.0, ge=0, le=1e4)
    """Host microseconds to issue one operator of an eager PyTorch block (Python module code, the
    dispatcher, autograd's recording, the kernel launch). Launches are asynchronous, so this is a
    floor, not an addition: a block's forward (backward) takes at least its operators
    (compute.block_ops) times this, whatever its FLOPs. It binds for small blocks at small
    micro-batches (KD students); 0: no floor (a CPU profile, where dispatch adds to the work:
    Overheads.layer_overhead_s)."""
    source: str = "default, uncalibrated"
    """Where these numbers come from (datasheet fit, calibration run, profile)."""

    @property
    def legacy_elementwise_fraction(self) -> float:
        """The older pricing's fraction (elementwise_overhead_fraction, 0.1 where unset)."""
        return 0.1 if self.elementwise_overhead_fraction is None else self.elementwise_overhead_fraction

    @model_validator(mode="after")
    def _one_elementwise_price(self) -> "ComputeEfficiency":
        if self.elementwise_bandwidth_fraction is not None and self.elementwise_overhead_fraction is not None:
            raise ValueError("set elementwise_bandwidth_fraction (schema 1.11: elementwise work priced by its bytes) "
                             "or the older elementwise_overhead_fraction, not both")
        return self


class GPUSpec(Strict):
    """One accelerator type (or, for the cpu-local profile, one CPU process)."""

    name: str
    """Identifier used by clusters, e.g. ``a100-80g``."""
    kind: Literal["gpu", "cpu"] = "gpu"
    """Device kind; ``cpu`` means a CPU process running gloo."""
    peak: PeakCompute
    """Dense peak compute per dtype."""
    memory_gib: float = Field(ge=1e-9, le=1e6)
    """Device memory (HBM) in GiB (2^30 bytes)."""
    memory_bandwidth_gb_per_s: float = Field(ge=1e-9, le=1e6)
    """Device memory bandwidth in GB/s (1e9 B/s)."""
    price_per_hour_usd: float | None = Field(default=None, ge=0, le=1e6)
    """Typical cloud price of one device-hour in US dollars (for --objective cost and what-if)."""
    efficiency: ComputeEfficiency = ComputeEfficiency()
    """Achieved-efficiency curve for this device type."""
    cache_mib: float = Field(default=0.0, ge=0, le=1e6)
    """Effective on-chip cache for memory-bound passes (the loss over the vocabulary): a pass over
    a tensor much smaller than this runs at ``cache_bandwidth_gb_per_s``, one much larger at the
    memory bandwidth (compute.loss_time blends the two). 0: no cache term (datasheet profiles)."""
    cache_bandwidth_gb_per_s: float | None = Field(default=None, ge=1e-9, le=1e7)
    """Bandwidth of those passes when their tensor fits the cache (measured by `kdplan profile`)."""
    topk_passes: dict[int, dict[int, float]] = Field(default_factory=dict)
    """The teacher's top-k encoding (log-softmax at T, top-k selection, tail mass, index packing) and
    its decoding into the student's target (once per teacher micro-batch, as the executor runs it;
    profiles before 2026-12-05 measured the encoding alone) as
    passes over its fp32 [tokens x V] logits, by vocabulary size V, then by k: measured by `kdplan
    profile` at the vocabularies of the profiled models, in the cost model's own unit (one pass of
    compute.loss_time at this device's fitted loss bandwidth and cache; one read pass where the
    profile measured no loss). On a CPU the selection is a partial sort whose cost grows with k
    and with k/V (cpu-local, V = 8,192: 13 passes at k = 16, 110 at k = 1,024; V = 128,256: 10
    and 32). Priced at the nearest measured V (in log V), interpolated linearly in log2 k, flat
    beyond the measured ks. Empty: compute.DEFAULT_TOPK_PASSES (GPU radix select)."""
    loss_passes: dict[int, dict[str, float]] = Field(default_factory=dict)
    """The student's training loss over the vocabulary as the executor runs it (forward, the
    checkpointed recompute and backward of executor.kd.losses.kd_loss), as passes over its fp32
    [tokens x V] logits, by vocabulary size V, then by the teacher target's kind: "dense", "topk",
    "sample", or "none" (plain training, no teacher). Measured by `kdplan profile` at the
    vocabularies of the profiled models, in the same unit as ``topk_passes``. On a CPU these
    passes are not memory traffic alone: every log-softmax (forward and backward) is bound by its
    exponentials, and every fresh [tokens x V] temporary by page faults, which a count of memory
    passes misses (cpu-local, V = 8,192: about 3x the counted passes). Priced at the nearest
    measured V (in log V). Empty, or a kind not measured: compute.CE_PASSES + compute.KD_PASSES."""
    sample_passes: dict[int, float] = Field(default_factory=dict)
    """The teacher's sampled encoding (sample:N: softmax at T, the CDF, systematic draws, index
    packing; executor.kd.compression.encode) and its decoding (decode, once per teacher micro-batch
    as the executor runs it; profiles before 2026-12-05: the encoding alone) as passes over its fp32 [tokens x V] logits, by
    vocabulary size V, measured by `kdplan profile` at N = 64 in the unit of ``topk_passes`` (the
    N searches are O(N log V), small beside the passes over V). Priced at the nearest measured V.
    Empty: compute.SAMPLE_PASSES (counted from the algorithm)."""
    loss_size_factor: dict[float, float] = Field(default_factory=dict)
    """The training step's vocabulary projection and loss (the head's forward and backward
    matmuls, executor.train._kd's dense KD loss, forward, recompute and backward) measured by
    `kdplan profile` at several micro-batch sizes, by the fp32 [tokens x V] logits size of one
    micro-batch in MiB: measured time over the priced one (compute.logits_time x 3 and
    compute.loss_time), normalised to 1 at the size ``loss_passes`` were measured at. Multiplies
    the training role's head and loss time (compute.loss_size_factor: interpolated in log size,
    flat beyond the measured sizes): a cliff the cache term does not see, e.g. a C allocator that
    hands blocks of 32 MiB and more back to the kernel and faults them in again every micro-batch
    (glibc's defaults; executor/hostmem.py; cpu-local, V = 8,192, 2.3x per element at 32 MiB with
    the defaults, 1.1x with freed memory kept). Empty: 1 at every size."""
    loss_heap_copies: dict[str, dict[float, float]] = Field(default_factory=dict)
    """CPU devices (kind "cpu"): the host heap the same training step leaves resident, in fp32
    [tokens x V] logits copies, by the teacher target's kind (as ``loss_passes``: "dense",
    "topk", "sample", "none"), then by the logits size of one micro-batch in MiB: a fresh
    process's peak RSS growth over its steps (`kdplan profile`, in the regime the executor runs:
    executor.hostmem keeps freed memory, so the heap's high-water mark stays resident). A kind
    measured at one size follows the dense curve's shape through that point. The memory model's
    ``loss_heap`` term is this less the logits and KD buffers it counts already
    (compute.loss_heap_bytes; no fragmentation on top: the measured high-water includes it).
    Ignored on a GPU (its caching allocator's reserve is fragmentation_fraction's). Empty, or a
    kind not measured: no term."""
    source: str
    """Where the numbers come from (datasheet URL or measurement)."""
    placeholder: bool = False
    """True while the numbers are guesses awaiting `kdplan profile`."""

    @model_validator(mode="after")
    def _check_loss_size_curves(self):
        curves = [("loss_size_factor", self.loss_size_factor)] + [
            (f"loss_heap_copies[{kind}]", curve) for kind, curve in self.loss_heap_copies.items()]
        for kind in self.loss_heap_copies:
            if kind not in LOSS_KINDS:
                raise ValueError(f"loss_heap_copies: {kind!r}: expected a kind in {', '.join(LOSS_KINDS)}")
        for name, curve in curves:
            for mib, x in curve.items():
                if not (0 < mib <= 1 << 30) or not (0 <= x <= 1e6) or (name == "loss_size_factor" and x <= 0):
                    raise ValueError(f"{name}: {mib} MiB -> {x} is out of range (size > 0 MiB, value "
                                     f"{'> 0' if name == 'loss_size_factor' else '>= 0'} and <= 1e6)")
        return self

    @model_validator(mode="after")
    def _check_loss_passes(self):
        for vocab, table in self.loss_passes.items():
            if not (1 <= vocab <= 1 << 24) or not table:
                raise ValueError(f"loss_passes: vocabulary {vocab} needs 1..2^24 tokens and at least one kind")
            for kind, passes in table.items():
                if kind not in LOSS_KINDS or not (0 < passes <= 1e6):
                    raise ValueError(f"loss_passes[{vocab}]: {kind!r} -> {passes} passes: expected a kind in "
                                     f"{', '.join(LOSS_KINDS)} and passes > 0")
        for vocab, passes in self.sample_passes.items():
            if not (1 <= vocab <= 1 << 24) or not (0 < passes <= 1e6):
                raise ValueError(f"sample_passes: vocabulary {vocab} -> {passes} passes is out of range "
                                 f"(V 1..2^24, passes > 0)")
        return self

    @model_validator(mode="after")
    def _check_topk_passes(self):
        for vocab, table in self.topk_passes.items():
            if not (1 <= vocab <= 1 << 24) or not table:
                raise ValueError(f"topk_passes: vocabulary {vocab} needs 1..2^24 tokens and at least one k")
            for k, passes in table.items():
                if not (1 <= k <= vocab) or not (0 < passes <= 1e6):
                    raise ValueError(f"topk_passes[{vocab}]: k={k} -> {passes} passes is out of range "
                                     f"(k 1..V, passes > 0)")
        return self


class Link(Strict):
    """One link tier, priced with the alpha-beta model T(S) = latency + S / (bandwidth * efficiency)."""

    name: str
    """What it is, e.g. ``NVLink3 via NVSwitch``, ``HDR InfiniBand``, ``PCIe Gen4 x16``, ``gloo loopback``."""
    bandwidth_gb_per_s: float = Field(ge=1e-9, le=1e6)
    """Unidirectional bandwidth per device in GB/s (1e9 B/s) on this tier."""
    latency_us: float = Field(default=5.0, ge=0, le=1e7)
    """Per-message (per hop) latency in microseconds."""
    efficiency: float = Field(default=0.8, ge=1e-9, le=1)
    """Achieved fraction of bandwidth for large messages (bus bandwidth / link bandwidth)."""
    op_bandwidth_factor: dict[Literal["all_reduce", "all_gather", "reduce_scatter", "send_recv"], float] = \
        Field(default_factory=dict)
    """Per collective, its achieved bandwidth relative to the ring model's (1 where absent): a
    library whose reduce-scatter is not a ring (gloo's on CPU: measured 0.27 here, slower than the
    all-reduce of the same buffer) gets a factor below 1. Fitted by `kdplan profile` from the
    large-message samples of each collective; NCCL's rings on GPUs: empty (all 1)."""
    source: str
    """Where the numbers come from."""

    @model_validator(mode="after")
    def _check_factors(self):
        for op, f in self.op_bandwidth_factor.items():
            if not (0 < f <= 100):
                raise ValueError(f"op_bandwidth_factor[{op}] = {f}: must be in (0, 100]")
        return self


class StorageTier(Strict):
    """Storage that can hold offline teacher outputs (the job-level cache, kdplan.cost.job).

    A node-local tier (NVMe in each node) gives every node ``capacity_tb`` and the bandwidths
    below; a shared tier (a parallel file system) gives the whole cluster ``capacity_tb`` and
    bandwidths shared by every node that reads or writes it."""

    name: str
    """What it is, e.g. ``internal NVMe (RAID 0)``, ``shared parallel file system``."""
    capacity_tb: float = Field(gt=0, le=1e9)
    """Usable capacity in TB (1e12 bytes): per node (node-local) or in all (shared)."""
    read_gb_per_s: float = Field(gt=0, le=1e7)
    """Sustained sequential read bandwidth in GB/s: per node (node-local) or aggregate (shared)."""
    write_gb_per_s: float = Field(gt=0, le=1e7)
    """Sustained sequential write bandwidth in GB/s: per node (node-local) or aggregate (shared)."""
    source: str
    """Where the numbers come from (datasheet, measurement, or an assumption said as such)."""
    capacity_measured: str | None = None
    """Set by ``kdplan profile`` when ``capacity_tb`` is the free space it measured: where and when,
    e.g. ``free space of /tmp on 2026-12-04 UTC``. Free space changes by the day, so a cache refused
    for it says so (kdplan.cost.job.fits); to plan with what the cache may really use, set
    ``capacity_tb`` in a copy of the profile (``--cluster FILE``) and remove this line."""


class Fabric(Strict):
    """How a node's GPUs reach the network between nodes, and how that network is built: NIC
    rails (NIC i of every node on rail i's leaf switches), leaf switches of ``nodes_per_leaf``
    nodes, spine uplinks with ``oversubscription``. kdplan/cost/topology.py turns it into a graph
    and prices concurrent inter-node traffic on it. Absent: one NIC per GPU at ``inter_node``'s
    rate on a non-blocking switch (what every collective formula assumed before)."""

    nics_per_node: int = Field(ge=1, le=1024)
    """NICs (rails) per node; their total rate is ``inter_node.bandwidth_gb_per_s`` x GPUs per node."""
    nodes_per_leaf: int = Field(default=0, ge=0, le=100_000)
    """Nodes under one leaf switch per rail; 0: every node on one switch (no spine hop)."""
    oversubscription: float = Field(default=1.0, ge=1, le=64)
    """Leaf downlink over uplink capacity (1: a non-blocking fat tree)."""
    switch_latency_us: float = Field(default=0.0, ge=0, le=1e4)
    """Latency added by each switch traversal beyond the first (a spine hop adds two)."""
    source: str = ""
    """Where the numbers come from."""


class NodeSpec(Strict):
    """A node: devices, the links between them and to the host."""

    gpu: str
    """GPUSpec name of the devices in this node."""
    gpus_per_node: int = Field(gt=0, le=1024)
    """Devices per node."""
    intra_node: Link
    """Device-to-device link inside a node (NVLink/NVSwitch; gloo on CPU)."""
    inter_node: Link
    """Per-device share of the network between nodes (InfiniBand)."""
    host: Link
    """Device-to-host link (PCIe / C2C), used for offload."""
    gpus_per_host_link: int = Field(default=1, ge=1, le=1024)
    """Devices that share one uplink to the host (the x16 link of a PCIe switch that serves several
    GPUs to the CPU): when they stream from host memory at once, as every rank of an offloaded
    teacher or optimizer does in lockstep, each gets ``host.bandwidth_gb_per_s`` / this (see
    kdplan.cost.comm.host_link). 1: each device's host link is its own (schema < 1.12)."""
    host_memory_gib: float = Field(ge=1e-9, le=1e7)
    """Host memory per node in GiB, the budget for offloaded weights and optimizer state."""
    local_storage: StorageTier | None = None
    """Node-local storage (NVMe) per node; None where the profile does not say."""
    fabric: Fabric | None = None
    """The network's shape beyond the per-GPU rate (rails, leaves, oversubscription); None: one
    NIC per GPU on a non-blocking switch."""
    source: str
    """Where the numbers come from."""

    @model_validator(mode="after")
    def _check_host_sharing(self):
        if self.gpus_per_host_link > self.gpus_per_node:
            raise ValueError(f"gpus_per_host_link {self.gpus_per_host_link} > gpus_per_node {self.gpus_per_node}: "
                             "a host uplink is shared by devices of one node")
        return self


class GPUGroup(Strict):
    """A set of identical nodes in a cluster."""

    node: NodeSpec
    """The node type."""
    num_nodes: int = Field(gt=0, le=100_000)
    """How many such nodes."""


class FrameworkOverheads(Strict):
    """Fixed costs of the executor's framework, measured by ``kdplan profile`` (executor.bench:
    real blocks at a few tiny token counts; the intercept of time against tokens is what no FLOP
    or byte term prices). All seconds, on one device; 0 where not measured (datasheet profiles).
    Priced by kdplan.cost.overhead. The per-block forward + backward cost is
    ``Overheads.layer_overhead_s``; the per-collective cost is each link's ``latency_us``."""

    micro_batch_s: float = Field(default=0.0, ge=0, le=10)
    """Seconds per training micro-batch outside the blocks, forward + backward: the embedding,
    final norm, output projection and loss calls and the autograd engine's start, at no tokens."""
    forward_micro_batch_s: float = Field(default=0.0, ge=0, le=10)
    """Seconds per forward-only (teacher) micro-batch outside the blocks, at no tokens."""
    tp_block_s: float = Field(default=0.0, ge=0, le=10)
    """Extra seconds per transformer block per training micro-batch (forward + backward) under
    tensor parallelism: DTensor dispatch and redistribution bookkeeping, the collectives' own
    latency excluded (links price it)."""
    fsdp_unit_s: float = Field(default=0.0, ge=0, le=10)
    """Extra seconds per FSDP2 unit (each block, plus the root) per training micro-batch (forward
    + backward): the pre/post forward and backward hooks, the collectives' latency excluded."""
    optimizer_tensor_s: float = Field(default=0.0, ge=0, le=10)
    """Seconds per parameter tensor per optimizer step (AdamW's per-tensor launches and Python),
    beyond its memory-bound update."""
    ddp_sync_byte_s: float = Field(default=0.0, ge=0, le=1e-6)
    """Seconds per gradient byte of one DDP gradient synchronisation beyond the all-reduce itself
    (the reducer copying each gradient into its flat bucket and back, the comm hook's averaging,
    the finalisation), once per optimizer step on a data-parallel role without ZeRO (dp > 1,
    zero 0): the micro-batch that synchronises less one under ``no_sync``, less the all-reduce's
    own time (links price it). 0 where not measured."""
    source: str | None = None
    """How these were measured (command, shapes, fit error)."""


class DeprecatedField(FutureWarning):
    """A profile key that is still read but no longer used: one line on stderr (kdplan.cli.main)."""


class Overheads(Strict):
    """Allowances the cost model adds on top of its physical terms (calibrated)."""

    @model_validator(mode="before")
    @classmethod
    def _storage_read_moved(cls, data):
        """``storage_read_gb_per_s`` (schema <= 1.5) duplicated the storage tiers' read bandwidth
        (a default of 5 GB/s written into every profile, never measured): offline reads are priced
        at the tiers' ``read_gb_per_s`` now, so an old profile loads with a warning, the key ignored."""
        if isinstance(data, dict) and "storage_read_gb_per_s" in data:
            data = dict(data)
            old = data.pop("storage_read_gb_per_s")
            warnings.warn(f"overheads.storage_read_gb_per_s = {old} is deprecated and not read: offline KD reads"
                          " its teacher outputs at the storage tiers' read_gb_per_s (groups[].node.local_storage,"
                          " then shared_storage; `kdplan profile` measures one); delete the key",
                          DeprecatedField, stacklevel=2)
        return data

    framework_memory_gib: float = Field(default=2.0, ge=0, le=1e4)
    """Memory per device taken by the runtime (CUDA context, NCCL buffers, kernels)."""
    fragmentation_fraction: float = Field(default=0.05, ge=0, le=1)
    """Allocator fragmentation and reserve, as a fraction of the bytes allocated and freed every
    step (activations, logits, gathered blocks, the optimizer step's copies): the model states
    (weights, gradients, optimizer state) are a few large buffers allocated once."""
    step_overhead_s: float = Field(default=0.0, ge=0, le=1e5)
    """Fixed time per optimizer step (data loading, logging, launch gaps)."""
    optimizer_bytes_per_s_fraction: float = Field(default=0.5, ge=1e-9, le=1)
    """Achieved fraction of memory bandwidth in the optimizer update (memory bound)."""
    loss_bytes_per_s_fraction: float = Field(default=0.5, ge=1e-9, le=1)
    """Achieved fraction of memory bandwidth in the loss over the vocabulary (log-softmax, KL,
    cross-entropy and their gradients in fp32: memory bound; the default matches the optimizer's)."""
    overlap_slowdown: float = Field(default=1.1, ge=1, le=10)
    """Compute slows by this factor while communication overlaps it (Galvatron's 1.1-1.3)."""
    layer_overhead_s: float = Field(default=0.0, ge=0, le=10)
    """Fixed time per transformer block per micro-batch (forward + backward), independent of the
    micro-batch size: kernel launches and framework bookkeeping (Galvatron's t(b) = k*b + c)."""
    optimizer_step_bytes: float = Field(default=0.0, ge=0, le=64)
    """Bytes per parameter this GPU updates that the runtime allocates for the optimizer step
    only, on top of the model states: an fp32 copy of the gradients made at the step, flattened
    copies, the optimizer's own temporaries (torch's foreach Adam: one fp32 tensor per
    parameter). The caching allocator cannot serve these large blocks from the backward's freed
    activation blocks, so they add to the peak. 0: a fused optimizer over persistent buffers
    (Megatron's main_grad, apex/DeepSpeed fused Adam)."""
    loss_fp32_logit_copies: int = Field(default=1, ge=1, le=4)
    """fp32 tensors of the [micro-batch, sequence, vocabulary / tp] logits that the runtime's loss
    holds at its peak next to the 16-bit logits. 1: an fp32 softmax made in one pass (kdplan's
    executor; Megatron-LM 2021, whose vocab_parallel_cross_entropy shifts its fp32 input in place).
    2: Megatron-core 0.6 (``logits.float()`` passed to vocab_parallel_cross_entropy, which subtracts
    the maximum into a new fp32 tensor: tensor_parallel/cross_entropy.py) and PaddleNLP 2.6
    (``prediction_scores.astype("float32")`` into CrossEntropyLoss, which keeps its fp32 softmax)."""
    fp32_main_grads: bool = False
    """Gradients are kept in fp32 (Megatron's main_grad, DeepSpeed's bf16 optimizer): 18 bytes per
    parameter of model state instead of mixed-precision Adam's 16."""
    overlap_grad_reduce: bool = True
    """The data-parallel gradient reduction overlaps the last micro-batch's backward (bucketed
    DDP); False where the runtime reduces after the backward (Megatron 2021, DeepSpeed pipeline)."""
    overlap_tp_comm: bool = False
    """Tensor-parallel collectives overlapped with the GEMMs next to them (Transformer Engine
    userbuffers, NeMo ``ub_tp_comm_overlap``): each sequence-parallel all-gather / reduce-scatter is
    split into tp chunks pipelined with the chunks of the GEMM that consumes / produces it, so a
    block's collectives show only where they outlast its GEMMs, and never less than one chunk
    (1/tp of them). False: they run between the GEMMs, exposed (Megatron, DeepSpeed, kdplan's executor)."""
    fp8_training_derating: float | None = Field(default=None, ge=1e-9, le=1)
    """The runtime's fp8 training GEMM efficiency relative to the bf16 curve (Layout.train_precision
    = fp8): replaces the GPU's ``low_precision_derating`` for a trained student's fp8 GEMMs, whose
    casts, scaling and transposes the fp8 recipe runs around them. None: the GPU's. Transformer
    Engine (delayed scaling, casts fused into the norms and transposes) sets it from the FlagPerf
    bf16/fp8 sibling runs (benchmarks/fp8_derating.py); torchao's dynamic scaling stays at the
    GPU's (its OLMo-core pairs imply about the same, 0.74)."""
    fp8_params: bool = False
    """A student trained in fp8 (Layout.train_precision = fp8) keeps its block Linear weights in fp8
    (Transformer Engine ``fp8_model_init``; NeMo ``FP8_PARAMS`` / ``fp8_params``, Megatron-Core
    ``--fp8-param-gather``: "keep the compute param in fp8 ... and perform the param all-gather in
    fp8"): the distributed optimizer casts its fp32 master shard straight to fp8 and all-gathers 1
    byte per Linear weight instead of the job's 2 (ZeRO-3 gathers likewise), and the GPU holds those
    weights at 1 byte with only TE's fp8 transpose beside them (kdplan.cost.fp8.fp8_param_saving).
    Norms and embeddings stay at the job's precision. No effect on a role that does not train in fp8."""
    overlap_p2p_comm: bool = False
    """Interleaved 1F1B only: the pipeline sends and receives are posted asynchronously and waited
    for just before the chunk that needs them (Megatron-Core ``overlap_p2p_comm``), so each send
    hides under the next chunk pass and shows only where it outlasts one. False: every send is on
    the critical path (Megatron 2021, DeepSpeed, kdplan's executor)."""
    overlap_param_gather: bool = False
    """ZeRO-1/2: the all-gather of the updated weights after the optimizer step overlaps the next
    forward (Megatron-Core ``overlap_param_gather``, InternEvo ``overlap_sync_param``); False (the
    default of Megatron, DeepSpeed ZeRO-1/2 and InternEvo's 7B config): it follows the step, exposed."""
    grad_comm_bytes: float = Field(default=4.0, ge=0.5, le=8)
    """Bytes per gradient element the data-parallel reduction moves: 4 where the runtime reduces
    fp32 gradients (Megatron's fp32 main_grad, DeepSpeed's bf16 optimizer; the default), 2 where
    it reduces the 16-bit ``.grad`` as it is (InternEvo's HybridZeroOptimizer: ``reduce_tensor``
    all-reduces the bucket in the gradient's own dtype). int8 gradient compression
    (Layout.grad_compression) moves 1 byte whatever this says."""
    zero1_param_sync: Literal["all_gather", "broadcast"] = "all_gather"
    """How ZeRO-1/2 gives every rank the weights the shard owners updated. ``all_gather``
    (Megatron's distributed optimizer, DeepSpeed ZeRO-1/2): all-gathers of the runtime's buckets.
    ``broadcast`` (InternEvo ``HybridZeroOptimizer.broadcast_params``): each of the k ranks of the
    shard group broadcasts its flat shard to the group, k calls in a row, each a ring through the
    whole group (comm.broadcast_time), so the calls' latency grows as k^2 with the group."""
    grad_bucket_mib: float | None = Field(default=None, gt=0, le=1e7)
    """Size of one data-parallel gradient collective (the runtime's bucket: DeepSpeed
    reduce_bucket_size 5e8 elements, InternEvo 512 MiB, PyTorch DDP 25 MiB): each call pays the
    collective's latency. None: the whole gradient buffer in one call."""
    p2p_scatter_gather: bool = True
    """Pipeline sends are split over the tensor-parallel ranks (Megatron's scatter/gather)."""
    block_ops: Literal["fused", "eager"] = "fused"
    """How a block's norms and gated MLP store what the backward needs. ``fused`` (Megatron,
    Transformer Engine; Korthikanti et al. 2022's count): a norm stores its 16-bit input, SwiGLU
    its gate and up outputs. ``eager`` (Hugging Face modeling code run op by op, e.g.
    LlamaRMSNorm's ``hidden_states.to(torch.float32)``, ``pow``, ``rsqrt``, ``weight * ...``): an
    RMSNorm stores an fp32 copy of its input and its 16-bit normalised output besides the next
    matmul's input (4 bytes per element more than fused), and SwiGLU stores the activation's
    output too (one more f-wide tensor)."""
    eager_elementwise_passes: float = Field(default=0.0, ge=0, le=1e4)
    """Under ``block_ops = eager``: the passes over a block's activations that op-by-op PyTorch
    makes beyond fused kernels (fp32 upcasts, separate norm, rotary, activation and residual
    kernels), each reading or writing b*s*(h + f) 16-bit elements per forward at the GPU's memory
    bandwidth (twice in the backward). Memory bound, so it weighs more where a GPU's FLOPs
    outgrow its bandwidth: fms-fsdp's 7B step drops 0.41 s on A100 and 0.24 s on H100 with
    torch.compile (1.7x, the ratio of their memory bandwidths). Fitted by ``kdplan validate --fit``."""
    fused_attention: bool = True
    """A fused attention kernel (FlashAttention, SDPA) never stores the s x s score matrix."""
    zero3_runtime: Literal["fsdp", "deepspeed"] = "fsdp"
    """How ZeRO-3 gathers weights. ``fsdp`` (PyTorch FSDP1/FSDP2, kdplan's executor): one unit per
    block, the block in use and the prefetched one unsharded (two blocks, plus one block's
    unsharded gradients), a full recompute reuses the weights gathered for the backward (two
    gathers per step). ``deepspeed`` (DeepSpeed ZeRO-3): per-module fetch within
    stage3_max_live_parameters (about one block live), parameters released after each module's
    forward, so a full recompute fetches them again (three gathers per step)."""
    selective_recompute: Literal["attention_core", "every_other_block", "blocks", "op_policy"] = "attention_core"
    """What ``recompute = selective`` does in this runtime. ``attention_core`` (the default: what
    kdplan's executor runs, executor/parallelize.py apply_ac, and Megatron's; Korthikanti et al.
    2022): recompute the attention core, never store the s x s scores. ``every_other_block``:
    torchtitan's layer-level selective checkpointing, every other block checkpointed whole.
    ``blocks``: a share ``checkpointed_block_fraction`` of the blocks checkpointed whole, evenly
    spaced (fms-fsdp's ``selective_checkpointing``; every_other_block is blocks at 0.5).
    ``op_policy``: torchtitan's op-level policy (save matmul and attention outputs except every
    second matmul, recompute the pointwise ops)."""
    checkpointed_block_fraction: float = Field(default=0.5, gt=0, le=1)
    """Under ``selective_recompute = blocks``: the share of the blocks checkpointed whole (their
    forward repeated in the backward, only their input stored); the others store everything."""
    vocab_parallel_loss: bool = True
    """The loss over the vocabulary runs on each tensor-parallel rank's V/tp slice of the logits
    (Megatron's vocabulary-parallel cross-entropy). False: the logits are all-gathered and every
    tp rank computes the whole loss (kdplan's executor, whose KD losses take full-vocabulary tensors)."""
    host_optimizer_gb_per_s: float = Field(default=50.0, ge=1e-9, le=1e6)
    """Effective bytes/s of an optimizer step on the host CPU (optimizer offload)."""
    expert_load_imbalance: float = Field(default=1.25, ge=1, le=64)
    """Under expert parallelism, the busiest rank's routed tokens over the balanced share: it
    multiplies that rank's expert compute and its all-to-all bytes (the group waits for it). A
    capacity-factor runtime pads every expert's buffer to this multiple of the even share (Switch
    Transformer, Fedus et al. 2022, Table 1, compares capacity factors 1.0, 1.25 and 2.0
    and finds the low ones best for its step time); a dropless
    runtime (DeepSeek-V3's aux-loss-free balancing, DeepSeek-AI 2024) runs at the observed
    imbalance, which balancing keeps near 1. Default 1.25; 1 is perfect balance. Without expert
    parallelism every rank runs its own tokens' top-k experts, so imbalance changes nothing."""
    framework: FrameworkOverheads = FrameworkOverheads()
    """The executor framework's measured fixed costs (kdplan profile); zeros unless measured."""


class Provenance(Strict):
    """Where a profile came from: a datasheet, a profiling run, or a calibration."""

    kind: Literal["datasheet", "profile", "calibration", "placeholder"] = "datasheet"
    """How the numbers were obtained."""
    date: str | None = None
    """ISO date of the measurement or calibration."""
    host: str | None = None
    """Host name where it was measured."""
    device: str | None = None
    """Device description (torch's view of it)."""
    torch_version: str | None = None
    """torch version used to measure."""
    command: str | None = None
    """Command line that produced this file."""
    reports: list[str] = []
    """Run reports a calibration was fitted to (path and sha256)."""
    notes: str | None = None
    """Free text."""


class ClusterProfile(Versioned):
    """A cluster: GPU types, node groups, links and cost-model allowances."""

    file_kind: ClassVar[str] = "cluster profile"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    name: str
    """Preset name, e.g. ``dgx-a100-80g``."""
    description: str = ""
    """One line for humans."""
    gpus: dict[str, GPUSpec]
    """GPU types used by the groups, keyed by GPUSpec.name (inlined from profiles/hardware)."""
    groups: list[GPUGroup] = Field(min_length=1)
    """Node groups; more than one makes a mixed cluster."""
    overheads: Overheads = Overheads()
    """Calibrated allowances."""
    shared_storage: StorageTier | None = None
    """The cluster's shared file system (capacity and bandwidths in all); None where unknown."""
    provenance: Provenance = Provenance()
    """Where the numbers come from."""
    placeholder: bool = False
    """True while any number is a guess awaiting measurement."""

    @model_validator(mode="after")
    def _check_gpus(self) -> "ClusterProfile":
        for g in self.groups:
            if g.node.gpu not in self.gpus:
                raise ValueError(
                    f"groups: node gpu {g.node.gpu!r} is not in gpus ({', '.join(sorted(self.gpus))})"
                )
        return self

    @property
    def num_gpus(self) -> int:
        return sum(g.num_nodes * g.node.gpus_per_node for g in self.groups)

    @property
    def is_mixed(self) -> bool:
        return len({g.node.gpu for g in self.groups}) > 1

    def gpu_of_group(self, i: int) -> GPUSpec:
        return self.gpus[self.groups[i].node.gpu]


class HardwareFile(Versioned):
    """A file under profiles/hardware/: one GPU type."""

    file_kind: ClassVar[str] = "hardware profile"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    gpu: GPUSpec
    """The device."""


class ClusterFile(Versioned):
    """A file under profiles/clusters/: nodes referencing GPU types by name.

    Either ``gpus`` inlines the GPU specs, or they are read from profiles/hardware/ by name.
    """

    file_kind: ClassVar[str] = "cluster profile"

    schema_version: str = SCHEMA_VERSION
    """Format version."""
    name: str
    """Preset name."""
    description: str = ""
    """One line for humans."""
    gpus: dict[str, GPUSpec] = {}
    """Inline GPU specs (optional; otherwise looked up under profiles/hardware/)."""
    groups: list[GPUGroup] = Field(min_length=1)
    """Node groups."""
    overheads: Overheads = Overheads()
    """Allowances."""
    shared_storage: StorageTier | None = None
    """The cluster's shared file system (capacity and bandwidths in all); None where unknown."""
    provenance: Provenance = Provenance()
    """Where the numbers come from."""
    placeholder: bool = False
    """True while any number is a guess."""
