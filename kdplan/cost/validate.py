"""Check the cost model against measured, published training runs (``kdplan validate``).

Each CSV row (columns of kdplan/data/published_runs_dev.csv) is turned into a plain-training
problem (``--teacher none``) and one pinned layout, priced with ``price_student``, and compared
with what the source measured: iteration time (derived from TFLOP/s with the source's own FLOP
formula when only TFLOP/s is printed), memory per GPU where given, and whether the run fit.

Where a source leaves a layout field out, this module fills it with a documented default
(``DEFAULTS`` below) and records the assumption on the row.
"""

from __future__ import annotations

import csv
import functools
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..problem import Problem
from ..profiles import load_cluster
from ..schema.cluster import Fabric
from ..schema.compression import Compression
from ..schema.job import JobSpec
from ..schema.model import ModelSpec
from ..schema.plan import Layout
from .compose import price_student
from .flops import layer_flops, megatron_iteration_flops, train_model_flops

DATA = Path(__file__).resolve().parent.parent / "data"
DEV_CSV = DATA / "published_runs_dev.csv"
# Published runs of other stacks (FSDP/HSDP, InternEvo, FlagPerf, EasyContext, MLPerf), with their
# source notes in published_runs_extra.md next to it (copied from shared/reference).
EXTRA_CSV = DATA / "published_runs_extra.csv"
ALL_CSVS = (DEV_CSV, EXTRA_CSV)

REQUIRED = ("row_id", "source_id", "source_location", "n_layers", "hidden_size", "n_heads",
            "ffn_hidden_size", "vocab_size", "seq_len", "gpu_type", "num_gpus", "global_batch_seqs",
            "micro_batch_size", "tp", "pp", "dp", "outcome")

# Which cluster profile a source ran on (profiles/clusters/); other sources fall back to the
# DGX preset of their GPU type.
SOURCE_CLUSTER = {"narayanan2021": "selene-a100-80g", "bloom_bigscience": "jean-zay-a100-80g"}
GPU_CLUSTER = (("h200", "dgx-h200"), ("h800", "dgx-h800"), ("h100", "dgx-h100"), ("a800", "dgx-a800"),
               ("a100-sxm4-40", "dgx-a100-40g"), ("a100 40", "dgx-a100-40g"), ("a100-40", "dgx-a100-40g"),
               ("a100", "dgx-a100-80g"))

# A source without a cluster profile borrows the runtime allowances (per-block cost, allocator
# reserve, gradient handling) of the calibrated source whose framework it names.
FRAMEWORK_LIKE = (("megatron-deepspeed", "bloom_bigscience"), ("megatron", "narayanan2021"))
# Frameworks with no calibrated source of their own but a runtime profile (profiles/clusters/)
# whose allowances are counted from their code (its provenance says how).
RUNTIME_PROFILES = (("internevo", "internevo-a800"), ("deepspeed", "deepspeed-hf-a100"), ("paddle", "paddle-a100"))

# Frameworks whose published runs all ran on one cluster that a profile describes: the rows take
# that profile's inter-node link efficiency (fitted on them, as jean-zay's on BLOOM's rows) and
# count as run on it (fit.Param scope). InternEvo's doc: "Inter-machine bandwidth 4 * 100Gb RoCE".
NETWORK_PROFILES = (("internevo", "internevo-a800"),)

# Settings a framework ships in the configuration its published runs used (not fitted): the
# runtime's gradient bucket and whether it overlaps the weights' all-gather with the next forward.
RUNTIME_SETTINGS = (
    ("internevo", {"grad_bucket_mib": 1024.0, "overlap_param_gather": False, "grad_comm_bytes": 2.0,
                   "zero1_param_sync": "broadcast"},
     "InternEvo configs/7B_sft.py hybrid_zero_optimizer: reduce_bucket_size 512*1024*1024 elements "
     "(HybridZeroOptimizer counts param.numel(): 1 GiB of bf16 gradients), overlap_sync_param=False; "
     "gradients all-reduced in bf16 over the whole data-parallel group, updated weights broadcast by "
     "each shard owner (hybrid_zero_optim.py reduce_tensor, broadcast_params)"),
    ("tp comm overlap", {"overlap_tp_comm": True},
     "tensor-parallel collectives overlapped with the GEMMs (Transformer Engine userbuffers, NeMo "
     "ub_tp_comm_overlap: the row's 'TP comm overlap')"),
    ("megatron-core", {"loss_fp32_logit_copies": 2},
     "Megatron-core 0.6's loss holds two fp32 copies of the logits: logits.float() into "
     "vocab_parallel_cross_entropy, which subtracts the maximum into a new tensor (tensor_parallel/cross_entropy.py)"),
)

DEFAULTS = {
    # OLMo-core's README does not state the GPU count; its scripts default to one node of 8.
    "num_gpus": 8,
    # Interleaved 1F1B "chunks per stage not stated": two model chunks per GPU where the stage's
    # layers split evenly (the smallest interleaving, as in the paper's Figure 12 experiments).
    "virtual_stages": 2,
    # Table 2 gives only the model-parallel size (96): TP = GPUs per node (the paper's heuristic).
    "tp_from_model_parallel": 8,
}


def rel_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, None when either is missing or not finite."""
    if predicted and measured and math.isfinite(predicted):
        return (predicted - measured) / measured
    return None


class _Errors:
    """Relative errors of a prediction next to its measurement (rows and run reports alike)."""

    @property
    def time_error(self) -> float | None:
        return rel_error(self.predicted_time_s, self.measured_time_s)

    @property
    def memory_error(self) -> float | None:
        return rel_error(self.predicted_memory_gib, self.measured_memory_gib)


@dataclass
class Case:
    """One row turned into something to price."""

    row: dict
    problem: Problem | None = None
    layout: Layout | None = None
    measured_time_s: float | None = None
    measured_memory_gib: float | None = None
    oom: bool = False
    assumptions: list[str] = field(default_factory=list)
    skip: str = ""
    free_micro_batch: bool = False  # not stated by the source: price the best that fits
    cluster_name: str = ""  # the cluster profile whose network the row runs on
    runtime: str = ""  # the cluster profile whose runtime allowances (overheads) the row borrows
    memory_stated: bool = True  # the source gives the GPU's memory size (else no fits verdict: see RowResult)
    warm_up: bool = False  # timed over a run's first steps only (WARM_UP): reported, not fitted


@dataclass
class RowResult(_Errors):
    row_id: str
    source: str
    table: str
    measured_time_s: float | None
    predicted_time_s: float | None
    measured_memory_gib: float | None
    predicted_memory_gib: float | None
    oom: bool
    predicted_fits: bool
    why: str = ""
    assumptions: list[str] = field(default_factory=list)
    skip: str = ""
    layout: str = ""  # the layout priced, e.g. "tp8 pp12 dp4 mb2 full"
    inputs: str = ""  # everything kdplan priced (model, job, layout, cluster): equal on a repeated config
    num_gpus: int = 0
    fit_known: bool = True  # False: the source does not state the GPU's memory size, so whether the
    # run fits says nothing about the memory model (it is priced on the largest variant, and the
    # verdict is neither counted in "fits / OOM predicted right" nor fitted on)

    @property
    def fit_agrees(self) -> bool:
        return self.predicted_fits != self.oom


@dataclass
class SourceSummary:
    source: str
    rows: int
    time_rows: int
    median_time_error: float | None
    mean_time_error: float | None
    memory_rows: int
    median_memory_error: float | None
    mean_memory_error: float | None
    fit_agree: int
    fit_rows: int
    tau_by_table: dict[str, float]
    skipped: int = 0
    repeat_noise: float = 0.0  # see repeat_noise(): pairs measured closer than this are not ranked
    time_error_by_gpus: dict[str, float | None] = field(default_factory=dict)  # GPU_BUCKETS -> median |error|

    @property
    def min_tau(self) -> float | None:
        vals = [t for t in self.tau_by_table.values() if not math.isnan(t)]
        return min(vals) if vals else None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a published-runs CSV; one clear InputError when the file or a column is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: not a published-runs CSV (missing columns: {', '.join(missing)})")
    return list(reader)


def _int(v: str) -> int | None:
    v = (v or "").strip()
    if not v:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def _count(v: str) -> int | None:
    """A count that leads its cell and may carry a note or a K suffix: "65536 (inferred: "64K")",
    "700K as written" (K = 1024, as the EasyContext notes assume), "8 per optimizer micro-step"."""
    m = re.match(r"\s*~?(\d[\d,]*(?:\.\d+)?)\s*([kK])?\b", v or "")
    if not m:
        return None
    n = float(m.group(1).replace(",", ""))
    return int(n * 1024) if m.group(2) else int(n)


def _float(v: str) -> float | None:
    v = (v or "").strip()
    try:
        return float(v) if v else None
    except ValueError:
        return None


def _vocab(text: str) -> int | None:
    """The vocabulary cell may carry a note ("~250k (... V=250880)"): prefer an explicit V=."""
    m = re.search(r"V\s*=\s*(\d+)", text or "") or re.search(r"(\d+)", (text or "").replace(",", ""))
    return int(m.group(1)) if m else None


def _model(row: dict, notes_out: list[str]) -> ModelSpec:
    a = _int(row["n_heads"])
    h = _int(row["hidden_size"])
    notes = " ".join((row.get(k) or "") for k in ("arch_notes", "model_name")).lower()
    gated = any(k in notes for k in ("swiglu", "gated", "geglu", "llama"))
    # A shape cell may carry a note after its number ("11008 (inferred: swiglu with --multiple-of 256)").
    f = _count(row.get("ffn_hidden_size", ""))
    if f is None and h:
        f = 4 * h
        notes_out.append("ffn_hidden_size 4h (not stated)")
    # GPT-3-style Megatron models tie the output projection to the embedding; Llama-style do not.
    tied = "untied" not in notes and ("tied" in notes or not gated)
    return ModelSpec(
        name=row.get("model_name") or row["row_id"], family="gpt", gated_mlp=gated,
        num_layers=_int(row["n_layers"]), hidden_size=h, num_heads=a,
        num_kv_heads=_int(row.get("n_kv_heads", "")) or a, ffn_hidden_size=f,
        vocab_size=_vocab(row["vocab_size"]), tied_embeddings=tied, max_positions=_count(row["seq_len"]),
        norm="rmsnorm" if ("rmsnorm" in notes or "llama" in notes) else "layernorm",
        learned_positions=not any(k in notes for k in ("alibi", "rope", "rotary", "llama")),
    )


def _cluster_name(row: dict) -> str | None:
    if row["source_id"] in SOURCE_CLUSTER:
        return SOURCE_CLUSTER[row["source_id"]]
    gpu = (row.get("gpu_type") or "").lower()
    return next((c for k, c in GPU_CLUSTER if k in gpu), None)


NIC_GBPS = {"edr": 100, "hdr": 200, "ndr": 400, "xdr": 800, "omni-path": 100, "opa": 100}


def _nics(text: str, host_gb_per_s: float = float("inf")) -> tuple[int, float, bool] | None:
    """(NICs per node, Gb/s each, whether the text counts them) from text like '8x 200 Gb/s HDR
    InfiniBand', '4 x 100 Gb RoCE per machine' or '4 Omni-Path links'; None when the text does not
    say. A rate with no NIC count is one GPU's NIC (None) unless it is faster than one GPU's host
    link (``host_gb_per_s``, PCIe) can feed: then it is the node's network, one NIC for all its GPUs
    (fms-fsdp's '128 GPUs with 400Gbps' on A100, whose PCIe Gen4 x16 carries ~25 GB/s, 200 Gb/s: a
    400 Gb/s figure can only be the node's)."""
    t = text.lower()
    rate = re.search(r"(\d+)\s*gb(?:it)?(?:/s|ps|s)?\b", t)  # "200 Gb/s", "400 Gbps", "100 Gb RoCE"
    gbps = float(rate.group(1)) if rate else next((v for k, v in NIC_GBPS.items() if k in t), None)
    count = re.search(r"(\d+)\s*x\b|(\d+)\s*(?:links|nics|hcas|adapters)", t)
    if gbps is None:
        return None
    if count is None:
        return (1, gbps, False) if gbps / 8 > host_gb_per_s else None
    return int(count.group(1) or count.group(2)), gbps, True


def _inter_node_gb_per_s(text: str, gpus_per_node: int, host_gb_per_s: float = float("inf")) -> float | None:
    """Per-GPU share of a node's network (GB/s) from the row's link text (``_nics``); None when
    the text does not say."""
    n = _nics(text, host_gb_per_s)
    return n[0] * n[1] / 8 / gpus_per_node if n else None


def runtime_like(row: dict) -> str | None:
    """The calibrated cluster profile whose runtime a row's framework borrows (FRAMEWORK_LIKE)."""
    framework = (row.get("framework") or "").lower()
    return next((SOURCE_CLUSTER[src] for key, src in FRAMEWORK_LIKE if key in framework),
                next((name for key, name in RUNTIME_PROFILES if key in framework), None))


def network_profile(row: dict) -> str | None:
    """The cluster profile describing the network a row's framework published its runs on (NETWORK_PROFILES)."""
    framework = (row.get("framework") or "").lower()
    return next((name for key, name in NETWORK_PROFILES if key in framework), None)


def _as_described(cluster, row: dict, notes: list[str]):
    """A source without its own cluster profile: the GPU type's preset, with the inter-node rate
    its row states and the runtime its row names (FlashAttention, Megatron's fp32 gradients)."""
    node = cluster.groups[0].node
    text = " ".join(str(v) for v in row.values()).lower()
    link_text = row.get("inter_node_link") or ""
    bw = _inter_node_gb_per_s(link_text, node.gpus_per_node, node.host.bandwidth_gb_per_s)
    if bw:
        nics, _, counted = _nics(link_text, node.host.bandwidth_gb_per_s)
        update: dict = {}
        if counted:
            # The row's NICs are the fabric's rails; how the switches are built is not stated: one
            # non-blocking switch (kdplan/cost/topology.py prices the rails, no spine hop).
            update["fabric"] = Fabric(nics_per_node=nics, source=f"the row's link description: {link_text}")
        link = {"bandwidth_gb_per_s": bw}
        if net := network_profile(row):
            link["efficiency"] = load_cluster(net).groups[0].node.inter_node.efficiency
        node = node.model_copy(update={"inter_node": node.inter_node.model_copy(update=link), **update})
        notes.append(f"inter-node {bw:g} GB/s per GPU" + (f" on {nics} NICs per node" if counted else "")
                     + " from the row's link description" + (f", at {net}'s achieved share" if net else ""))
    framework = (row.get("framework") or "").lower()
    like = runtime_like(row)
    ov = load_cluster(like).overheads if like else cluster.overheads
    if like:
        notes.append(f"runtime allowances of {like} ({framework.split('(')[0].strip()})")
    # FlashAttention named on the row, or PyTorch's own stacks (FSDP, OLMo-core), whose
    # scaled_dot_product_attention runs a fused kernel on A100/H100 by default (torch >= 2.0).
    # ChatGLM3's Hugging Face modeling code calls torch's scaled_dot_product_attention (CoreAttention,
    # torch >= 2; THUDM/chatglm3-6b modeling_chatglm.py).
    # Transformer Engine's DotProductAttention picks FlashAttention or cuDNN fused attention by
    # default (NVTE_FLASH_ATTN=1, NVTE_FUSED_ATTN=1 unless the environment turns them off).
    te = "transformer engine" in framework + " " + (row.get("precision") or "").lower()
    native = any(k in framework for k in ("pytorch fsdp", "olmo-core", "fsdp2", "chatglm3")) or te
    stated = stated_fused_attention(row)
    update = {"fused_attention": native if stated is None else stated,
              "overlap_grad_reduce": ov.overlap_grad_reduce or "overlap" in text}
    if ops := stated_block_ops(row):
        update["block_ops"] = ops
        notes.append(f"{ops} norms (use_fused_rms_norm on the row)")
    ov = ov.model_copy(update=update)
    # PyTorch's own stacks run the blocks op by op unless the row says they were torch.compile'd
    # (fms-fsdp's first two README tables: "no torch.compile"; OLMo-core and the third table compile).
    if native and "no torch.compile" in text:
        ov = ov.model_copy(update={"block_ops": "eager"})
        notes.append("blocks run op by op (no torch.compile): eager elementwise passes")
    for key, update, why in RUNTIME_SETTINGS:
        if key in framework:
            ov = ov.model_copy(update=update)
            notes.append(why)
    if te and trains_in_fp8(row):
        ov = ov.model_copy(update={"fp8_training_derating": TE_FP8_DERATING})
        notes.append(f"Transformer Engine fp8 GEMMs at {TE_FP8_DERATING} of the bf16 curve x the fp8 peak "
                     "(benchmarks/fp8_derating.py)")
        if states_fp8_params(row):
            ov = ov.model_copy(update={"fp8_params": True})
            notes.append("fp8 parameters (the row's FP8_PARAMS): block Linear weights held and all-gathered "
                         "by the distributed optimizer at 1 byte")
    groups = [g.model_copy(update={"node": node}) for g in cluster.groups]
    return cluster.model_copy(update={"groups": groups, "overheads": ov})


# A fused attention kernel named in a cell: FlashAttention in its spellings ("flash-attention-2",
# "flash-attn v2", "FlashAttention", "flash_attention=True", "ring-flash-attention") or torch's SDPA.
_ATTN_KERNEL = re.compile(r"flash[\s_-]?att(?:ention|n)?|\bsdpa\b|scaled_dot_product_attention", re.I)
# The same mention negated: "no flash-attn", "WITHOUT flash-attention", "flash_attention=False".
_NEGATED_BEFORE = re.compile(r"\b(?:no|not|without|w/o|disabled?)[\s(]+$", re.I)
_NEGATED_AFTER = re.compile(r"^[\w-]*\s*[=:]\s*(?:false|0|off)\b", re.I)
# Attention the row says runs op by op (the s x s scores in HBM).
_EAGER_ATTENTION = re.compile(r"\beager attention\b", re.I)


def stated_fused_attention(row: dict) -> bool | None:
    """Whether a row says its attention ran as a fused kernel: False when any cell says it ran
    without one ("run WITHOUT flash-attention", "(no flash-attn)", "flash_attention=False", "eager
    attention"), True when a cell names one, None when the row is silent. Each mention is read
    with its own negation, never as a substring of the row (FLAG-BC2's "no flash-attn" is a
    statement that the kernel was not used)."""
    named = False
    for cell in row.values():
        text = str(cell or "")
        if _EAGER_ATTENTION.search(text):
            return False
        for m in _ATTN_KERNEL.finditer(text):
            if _NEGATED_BEFORE.search(text[:m.start()]) or _NEGATED_AFTER.match(text[m.end():]):
                return False
            named = True
    return True if named else None


# Paddle's fused RMSNorm switch (PaddleNLP config ``use_fused_rms_norm``): False runs the norm op by
# op in fp32 (cast, pow, mean, rsqrt, multiply: Overheads.block_ops "eager").
_FUSED_NORM = re.compile(r"use_fused_rms_norm\s*=\s*(true|false)\b", re.I)


def stated_block_ops(row: dict) -> str | None:
    """"eager" | "fused" where the row states how its norms ran; None when it does not."""
    for cell in row.values():
        if m := _FUSED_NORM.search(str(cell or "")):
            return "fused" if m.group(1).lower() == "true" else "eager"
    return None


# Transformer Engine's fp8 training GEMMs relative to the bf16 efficiency curve at the fp8 peak
# (Overheads.fp8_training_derating): the median over FlagPerf's two bf16/fp8 sibling pairs (Llama-3-8B,
# Megatron-Core 0.6 + TE, 8 and 16 H100: 0.860, 0.870), `python benchmarks/fp8_derating.py`.
# The MLPerf GPT-3 rows (also TE) are not used for it, so their error is a held-out check of it.
TE_FP8_DERATING = 0.865


def _not_priced(row: dict) -> str:
    """Why kdplan cannot price a row's setup at all ('' when it can): what the student would need
    that no kdplan layout expresses. These rows are reported as skipped, with the reason."""
    recompute = (row.get("recompute") or "").lower()
    if "fraction" in recompute and "not stated" in recompute and _hfu_over_mfu(row) is None:
        return ("checkpointing of an unstated fraction of the blocks (fms-fsdp 'selective'): its memory and "
                "recompute time depend on the fraction, which the source does not give")
    return ""


def _hfu_over_mfu(row: dict) -> tuple[float, float, float] | None:
    """(HFU/MFU, its lowest, its highest given the printed percentages' rounding to 0.5) where a
    row prints both and its MFU leaves recomputation out while its HFU counts it (fms-fsdp: MFU
    by the nanoGPT/PaLM formula, HFU by PyTorch's FLOP counter); None otherwise."""
    hfu, mfu = _float(row.get("meas_hfu_pct", "")), _float(row.get("meas_mfu_pct", ""))
    basis = (row.get("tflops_basis") or "").lower()
    if not (hfu and mfu) or "includes recompute" not in basis or "no recompute" not in basis:
        return None
    return hfu / mfu, (hfu - 0.5) / (mfu + 0.5), (hfu + 0.5) / (mfu - 0.5)


def checkpointed_block_fraction(row: dict, model: ModelSpec) -> tuple[float, str] | None:
    """The share of blocks a block-level selective checkpointing run recomputed, from the HFU and
    MFU it prints: HFU counts the recomputed forwards, MFU does not, so HFU/MFU - 1 is the
    recomputed FLOPs over the model FLOPs (3 x the forward of the blocks and the vocabulary
    projection), and a share f of the blocks recomputed adds f x the blocks' forward. Clamped to
    (0, 1]; None where the row does not print both. With the note saying how wide the rounding
    of the printed percentages leaves it."""
    ratio = _hfu_over_mfu(row)
    if ratio is None:
        return None
    # One configuration run on several GPU types (fms-fsdp: "same scripts/configs on both GPU
    # types"): its rows are readings of one fraction, pooled (the mean of their ratios and bounds).
    same = [r for r in _same_config(row) if _hfu_over_mfu(r) is not None] or [row]
    ratio = tuple(statistics.fmean(_hfu_over_mfu(r)[i] for r in same) for i in range(3))
    s = _count(row["seq_len"]) or model.max_positions
    blocks = model.num_layers * layer_flops(model, b=1, s=s).total
    train = train_model_flops(model, sequences=1, s=s)

    def frac(x: float) -> float:
        return min(1.0, max(0.0, (x - 1) * train / blocks))

    f, lo, hi = (frac(x) for x in ratio)
    if f <= 0:
        return None
    pairs = ", ".join(f"{r['meas_hfu_pct']}/{r['meas_mfu_pct']}" for r in same)
    note = (f"{f:.2f} of the blocks checkpointed whole (fms-fsdp selective_checkpointing), from HFU/MFU = {pairs} "
            f"({len(same)} GPU type{'s' if len(same) > 1 else ''}, same configuration; recomputed FLOPs = HFU/MFU - 1 "
            f"of the model's; the percentages' rounding allows {lo:.2f}-{hi:.2f})")
    return f, note


def _same_config(row: dict) -> list[dict]:
    """The rows of ``row``'s table (source location) that ran its model with its batch and
    checkpointing setting: the same configuration, on every GPU type the table lists."""
    key = ("source_location", "model_name", "micro_batch_size", "recompute", "seq_len")
    return [r for r in _extra_rows() if all(r.get(k) == row.get(k) for k in key)]


@functools.lru_cache(maxsize=1)
def _extra_rows() -> tuple[dict, ...]:
    return tuple(read_rows(EXTRA_CSV))


def trains_in_fp8(row: dict) -> bool:
    """Whether a row trained its GEMMs in fp8 (Transformer Engine / torchao float8): priced with
    Layout.train_precision = "fp8" (kdplan.cost.fp8), its other work at bf16."""
    prec = (row.get("precision") or "").lower()
    return "fp8" in prec or "float8" in prec


_FP8_PARAMS = re.compile(r"\bfp8[_ ]param(?:eter)?s\b(?!\s*=\s*(?:false|0|off)\b)", re.I)


def states_fp8_params(row: dict) -> bool:
    """Whether a row's precision cell says the weights themselves were fp8 (NeMo ``FP8_PARAMS=True``,
    "FP8 parameters"; Overheads.fp8_params), not only the GEMMs."""
    return bool(_FP8_PARAMS.search(row.get("precision") or ""))


def _precision(row: dict) -> str:
    """The training precision the cell leads with ("fp32 (README precision column; ...)" is fp32,
    "bf16 (ds_config ...)" bf16); otherwise bf16 where named, else 16-bit mixed precision (fp16)."""
    p = (row.get("precision") or "").lower()
    if m := re.match(r"\s*(bf16|fp16|fp32)\b", p):
        return m.group(1)
    return "bf16" if "bf16" in p else "fp16"


def _recompute(row: dict) -> str:
    r = (row.get("recompute") or "").lower()
    if r.startswith("none") or r.startswith("unclear"):
        return "none"
    if "every block" in r:  # fms-fsdp selective_checkpointing=1: every block checkpointed whole
        return "full"
    if "selective" in r:
        return "selective"
    if "full" in r or "checkpoint" in r or "assumes full" in r:
        return "full"
    return "none"


def _measured_time(row: dict, model: ModelSpec, gpu_peak_tflops: float) -> tuple[float | None, str]:
    """The iteration time a row measured, or derived from its throughput with its own FLOP
    convention: iteration time, samples/s, tokens/s, TFLOP/s per GPU (basis: Narayanan Eq. 3 when
    it counts the recomputed forward, 6*N*D when it says so, else model FLOPs), MFU."""
    t = _float(row.get("meas_iteration_time_s", ""))
    if t:
        return t, ""
    B, s, n = _count(row["global_batch_seqs"]), _count(row["seq_len"]), _int(row["num_gpus"])
    if not (B and s and n):
        return None, ""
    sps = _float(row.get("meas_samples_per_sec", ""))
    if sps:
        return B / sps, "iteration time = global batch / samples per second"
    tps = _float(row.get("meas_tokens_per_sec_total", "")) or (
        (_float(row.get("meas_tokens_per_sec_per_gpu", "")) or 0) * n)
    if tps:
        return B * s / tps, "iteration time = tokens per step / tokens per second"
    model_flops = train_model_flops(model, sequences=B, s=s)
    tf = _float(row.get("meas_tflops_per_gpu", ""))
    if tf:
        basis = (row.get("tflops_basis") or "").lower()
        if "eq.3" in basis or "recompute" in basis or "hardware" in basis:
            flops = megatron_iteration_flops(batch=B, s=s, layers=model.num_layers, hidden=model.hidden_size,
                                             vocab=model.vocab_size, recompute=True)
            return flops / (tf * 1e12 * n), "iteration time from TFLOP/s with Narayanan Eq.3"
        if "6nd" in basis.replace(" ", "").replace("*", ""):
            return 6 * model.num_params() * B * s / (tf * 1e12 * n), "iteration time from TFLOP/s with 6ND"
        return model_flops / (tf * 1e12 * n), "iteration time from TFLOP/s as model FLOPs"
    mfu = _float(row.get("meas_mfu_pct", ""))
    if mfu:
        peak = _float(row.get("peak_tflops_basis", "").split(" ")[0]) or gpu_peak_tflops
        return model_flops / (mfu / 100 * peak * 1e12 * n), "iteration time from MFU"
    return None, ""


# A time the source took over a run's first few steps ("Measured ... for the first 5 training steps,
# so expect some variance": EasyContext) holds warm-up (allocator growth, communicator set-up,
# kernel autotuning) that a steady-state step does not; the cost model prices steady-state steps,
# so such rows are reported but do not steer the fit (fit._Pricer).
WARM_UP = re.compile(r"\bfirst \d+ (?:training )?(?:steps|iterations)\b", re.I)


def build_case(row: dict) -> Case:
    """Turn one CSV row into a problem and a pinned layout (or a skip reason)."""
    case = Case(row=row)
    try:
        model = _model(row, case.assumptions)
    except Exception as e:  # a malformed row is reported, not fatal
        case.skip = f"model shape: {e}"
        return case
    case.skip = _not_priced(row)
    if case.skip:
        return case
    cname = _cluster_name(row)
    n = _int(row["num_gpus"])
    if not n and row["source_id"] == "olmo_core_readme":
        n = DEFAULTS["num_gpus"]
        row = {**row, "num_gpus": str(n)}
        case.assumptions.append(f"{n} GPUs (not stated; the scripts' default of one node)")
    if cname is None or not n:
        case.skip = f"unknown GPU type {row.get('gpu_type')!r}"
        return case
    try:
        cluster = load_cluster(cname, n)
    except InputError as e:
        case.skip = str(e)
        return case
    case.cluster_name = case.runtime = cname
    if row["source_id"] not in SOURCE_CLUSTER:
        cluster = _as_described(cluster, row, case.assumptions)
        case.runtime = runtime_like(row) or cname
        if _inter_node_gb_per_s(row.get("inter_node_link") or "", 8) and network_profile(row):
            case.cluster_name = network_profile(row)
    tp, pp, dp = _int(row["tp"]), _int(row["pp"]), _int(row["dp"])
    derived = (row.get("derived_fields") or "").lower()
    zero_text = (row.get("zero_or_sharding") or "").lower()
    zero = 0
    if tp is None and pp is None:
        text = derived + " " + (row.get("notes") or "").lower()
        mtp, mpp = re.search(r"\btp\s*=\s*(\d+)", derived), re.search(r"\bpp\s*=\s*(\d+)", derived)
        mp = re.search(r"model-parallel size (\d+)|\bmp\s*=\s*(\d+)", text)
        size = int(mp.group(1) or mp.group(2)) if mp else 1
        if mtp and mpp:
            tp, pp = int(mtp.group(1)), int(mpp.group(1))
            case.assumptions.append(f"tp={tp} pp={pp} from the source's derived fields")
        elif size == 1:
            tp, pp, zero = 1, 1, 3
            case.assumptions.append("ZeRO-3 data parallelism (model-parallel size 1)")
        else:
            tp = DEFAULTS["tp_from_model_parallel"]
            pp = size // tp
            case.assumptions.append(f"tp={tp} pp={pp} from model-parallel size {size}")
    tp, pp = tp or 1, pp or 1
    # Context parallelism (ring attention; EasyContext's cp = ring degree): Layout.cp.
    cp = _int(row.get("cp", "")) or 1
    dp = dp or n // (tp * pp * cp)
    if not _count(row["global_batch_seqs"]) and (gb := _int(row.get("global_batch_tokens", ""))):
        row = {**row, "global_batch_seqs": str(gb // model.max_positions)}
    if any(k in zero_text for k in ("zero-3", "zero3", "full_shard", "full shard", "fsdp parameter")):
        zero = 3
    elif "zero-2" in zero_text or "stage2" in zero_text:
        zero = 2
    elif any(k in zero_text for k in ("zero-1", "zero stage 1", "stage1", "distributed optimizer")):
        zero = 1
    # Hybrid sharding: FSDP's HSDP (full shard inside a node, replicated across nodes), InternEvo's
    # zero1=N (optimizer states sharded over N GPUs of a node): Layout.shard_group.
    shard_group = None
    gpn = _int(row.get("gpus_per_node", "")) or cluster.groups[0].node.gpus_per_node
    if m := re.search(r"sharding group of (\d+) gpus within a node", zero_text):
        shard_group = int(m.group(1))
    elif "hsdp" in zero_text and zero:
        shard_group = max(1, gpn // (tp * pp))
    if shard_group is not None and (shard_group >= dp or dp % shard_group):
        shard_group = None
    b = _int(row["micro_batch_size"])
    sched_text = (row.get("pipeline_schedule") or "").lower()
    schedule, v = "1f1b", _int(row.get("virtual_pp_stages", "")) or 1
    if "interleaved" in sched_text and "num_chunks=1" not in sched_text.replace(" ", ""):
        schedule = "interleaved_1f1b"
        if v == 1:
            per_stage = model.num_layers // pp
            v = DEFAULTS["virtual_stages"] if per_stage % DEFAULTS["virtual_stages"] == 0 else 1
            case.assumptions.append(f"{v} virtual stages (not stated)")
    elif "gpipe" in sched_text:
        schedule = "gpipe"
    if schedule == "interleaved_1f1b" and "overlap_p2p_comm" in sched_text.replace(" ", ""):
        cluster = cluster.model_copy(update={"overheads": cluster.overheads.model_copy(update={"overlap_p2p_comm": True})})
        case.assumptions.append("pipeline sends overlapped with the next chunk (overlap_p2p_comm on the row)")
    recompute = _recompute(row)
    if recompute == "selective" and (blocks := checkpointed_block_fraction(row, model)):
        ov = cluster.overheads.model_copy(update={"selective_recompute": "blocks",
                                                  "checkpointed_block_fraction": blocks[0]})
        cluster = cluster.model_copy(update={"overheads": ov})
        case.assumptions.append(blocks[1])
    sp = (row.get("sequence_parallel") or "").strip().lower().startswith("yes")
    offload = "none"
    if "cpu offload" in zero_text and "optimizer" in zero_text:
        offload = "optimizer"
        if "param" in zero_text:
            # ZeRO-3 offload keeps each GPU's parameter shard in host memory and copies it up
            # before each gather: 1/dp of the weights per gather over PCIe, a small share of a
            # long-sequence step, not a kdplan layout term.
            case.assumptions.append("parameter shards in host memory priced as on the GPU (their PCIe copies, "
                                    "1/dp of the weights per gather, are not priced)")
    try:
        layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, zero=zero, shard_group=shard_group, micro_batch=b or 1,
                        recompute=recompute, sequence_parallel=sp, virtual_stages=v, schedule=schedule,
                        num_gpus=tp * pp * dp * cp, offload=offload,
                        train_precision="fp8" if trains_in_fp8(row) else "job")
        job = JobSpec(teacher=None, student=model.name, cluster=cname, gpus=n, seq_len=model.max_positions,
                      global_batch=_count(row["global_batch_seqs"]),
                      precision="bf16" if trains_in_fp8(row) else _precision(row))
    except Exception as e:
        case.skip = f"layout: {e}"
        return case
    case.problem = Problem(job=job, teacher=None, student=model, cluster=cluster)
    case.layout = layout
    if b is None:
        case.free_micro_batch = True
        case.assumptions.append("micro-batch not stated: the fastest that fits (the authors tuned it)")
    case.oom = (row.get("outcome") or "").strip().lower() == "oom"
    if WARM_UP.search(row.get("notes") or ""):
        case.warm_up = True
        case.assumptions.append("timed over the run's first steps (warm-up included): reported, not fitted")
    if "gpu_mem_gb" in row and not (row.get("gpu_mem_gb") or "").strip():
        case.memory_stated = False
        case.assumptions.append(f"GPU memory size not stated: priced on {cluster.gpu_of_group(0).name} (no fits verdict)")
    peak = cluster.gpu_of_group(0).peak.bf16_tflops
    case.measured_time_s, note = _measured_time(row, model, peak)
    if note and case.measured_time_s:
        case.assumptions.append(note)
    mem = _float(row.get("meas_memory_per_gpu", ""))
    # BLOOM's chronicles print "GB" from DeepSpeed's memory report, which divides by 2^30.
    case.measured_memory_gib = mem
    return case


def run_case(case: Case) -> RowResult:
    row = case.row
    common = dict(row_id=row["row_id"], source=row["source_id"], table=row["source_location"],
                  measured_time_s=case.measured_time_s, measured_memory_gib=case.measured_memory_gib,
                  oom=case.oom, assumptions=case.assumptions, fit_known=case.memory_stated)
    if case.skip:
        return RowResult(predicted_time_s=None, predicted_memory_gib=None, predicted_fits=False,
                         skip=case.skip, **common)
    price = price_student(case.problem, case.layout, compression=Compression("dense"))
    if case.free_micro_batch:
        per_replica = case.problem.job.global_batch // case.layout.dp
        for b in (2, 4, 8, 16):
            if per_replica % b:
                continue
            lay = case.layout.model_copy(update={"micro_batch": b})
            p = price_student(case.problem, lay, compression=Compression("dense"))
            if p.fits and p.time_s < price.time_s:
                price = p
    step = price.time_s + case.problem.cluster.overheads.step_overhead_s
    lay = case.layout
    mb = case.problem.job.global_batch // (lay.dp * price.num_micro_batches)
    common["layout"] = (f"tp{lay.tp} pp{lay.pp} dp{lay.dp}" + (f" cp{lay.cp}" if lay.cp > 1 else "") + f" mb{mb}"
                        + (f" v{lay.virtual_stages}" if lay.virtual_stages > 1 else "")
                        + (f" zero{lay.zero}" if lay.zero else "") + (f" shard{lay.shard}" if lay.shard < lay.dp else "")
                        + f" {lay.recompute}")
    p = case.problem
    common["inputs"] = "|".join((p.student.model_dump_json(), p.job.model_dump_json(),
                                 case.layout.model_dump_json(), case.cluster_name, case.runtime))
    common["num_gpus"] = p.job.gpus or 0
    return RowResult(predicted_time_s=step if math.isfinite(step) else None,
                     predicted_memory_gib=price.memory_gib or None, predicted_fits=price.fits,
                     why=price.why, **common)


def table_section(table: str) -> str:
    """The published table a row comes from: its source location without the row's own spec
    (InternEvo's "Parallel Configuration x GPUs" is one table whose (tp, zero1) rows kdplan ranks
    as four sweeps). The commit stays: the same table at another commit is another version."""
    return re.sub(r"\s+row \([^)]*\)", "", table)


def repeat_noise(results: list[RowResult]) -> dict[str, float]:
    """Per source, how far apart one published table puts runs that kdplan cannot tell apart:
    the largest relative spread, (max - min) / min, of the measured times of rows of the same
    table (table_section) with identical priced inputs (same model, job, layout and cluster).
    0 where a source repeats no configuration inside a table. Repeats across tables are not
    counted: they span software versions (fms-fsdp's README tables) or cluster fixes (BLOOM's
    02-25 PCIe/NUMA fix), which are real changes, not noise."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r.inputs and r.measured_time_s and not r.oom:
            groups.setdefault((r.source, table_section(r.table), r.inputs), []).append(r.measured_time_s)
    noise: dict[str, float] = {}
    for (src, _, _), ts in groups.items():
        if len(ts) > 1:
            noise[src] = max(noise.get(src, 0.0), (max(ts) - min(ts)) / min(ts))
    return noise


def kendall_tau(xs: list[float], ys: list[float], noise: float = 0.0) -> float:
    """Kendall tau-b (ties counted once on each side); NaN with fewer than 2 comparable pairs.
    ``noise``: pairs whose ys differ by no more than this share of the smaller are left out (their
    measured order is within the source's repeat noise, so it says nothing about the inputs)."""
    conc = disc = tx = ty = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if noise and dy and abs(dy) <= noise * min(abs(ys[i]), abs(ys[j])):
                continue
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else float("nan")


# GPU-count buckets of validate's scale view: one node to a few, a few hundred, the largest runs.
GPU_BUCKETS = (("<=64", 1, 64), ("65-512", 65, 512), (">512", 513, 10**9))


def table_taus(rs: list[RowResult], noise: float = 0.0, min_rows: int = 2) -> dict[str, float]:
    """Kendall tau of predicted against measured time inside each sweep table of one source's
    rows (``noise``: repeat_noise of the source)."""
    taus: dict[str, float] = {}
    for table in dict.fromkeys(r.table for r in rs):
        pts = [(r.predicted_time_s, r.measured_time_s) for r in rs
               if r.table == table and r.time_error is not None and not r.oom]
        if len(pts) >= min_rows:
            taus[table] = kendall_tau([p for p, _ in pts], [m for _, m in pts], noise)
    return taus


def summarize(results: list[RowResult]) -> list[SourceSummary]:
    out = []
    noise = repeat_noise(results)
    for src in dict.fromkeys(r.source for r in results):
        rs = [r for r in results if r.source == src]
        te = [abs(r.time_error) for r in rs if r.time_error is not None and not r.oom]
        me = [abs(r.memory_error) for r in rs if r.memory_error is not None and not r.oom]
        fit_rows = [r for r in rs if not r.skip]
        verdicts = [r for r in fit_rows if r.fit_known]
        taus = table_taus(rs, noise.get(src, 0.0))
        by_gpus: dict[str, float | None] = {}
        for name, lo, hi in GPU_BUCKETS:
            b = [abs(r.time_error) for r in rs if r.time_error is not None and not r.oom and lo <= r.num_gpus <= hi]
            by_gpus[name] = statistics.median(b) if b else None
        out.append(SourceSummary(
            source=src, rows=len(rs), time_rows=len(te),
            median_time_error=statistics.median(te) if te else None,
            mean_time_error=statistics.fmean(te) if te else None,
            memory_rows=len(me), median_memory_error=statistics.median(me) if me else None,
            mean_memory_error=statistics.fmean(me) if me else None,
            fit_agree=sum(r.fit_agrees for r in verdicts), fit_rows=len(verdicts), tau_by_table=taus,
            skipped=len(rs) - len(fit_rows), repeat_noise=noise.get(src, 0.0), time_error_by_gpus=by_gpus))
    return out


def validate_csv(path: str | Path = DEV_CSV) -> list[RowResult]:
    return [run_case(build_case(r)) for r in read_rows(path)]


@dataclass
class ReportComparison(_Errors):
    """A run report's own prediction next to its measurement."""

    path: str
    predicted_time_s: float | None
    measured_time_s: float
    predicted_memory_gib: float | None
    measured_memory_gib: float


def compare_reports(paths: list[str]) -> list[ReportComparison]:
    """Predicted vs measured step time and peak memory of ``kdplan run`` reports."""
    from ..io import load_model
    from ..schema.report import RunReport

    out = []
    for p in paths:
        rep = load_model(RunReport, p)
        pred = rep.predicted
        out.append(ReportComparison(
            path=str(p), predicted_time_s=pred.step_time_s if pred else None,
            measured_time_s=rep.measured.step_time_s,
            predicted_memory_gib=pred.memory_per_gpu_gib if pred else None,
            measured_memory_gib=rep.measured.peak_memory_gib))
    return out
