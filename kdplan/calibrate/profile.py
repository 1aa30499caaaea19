"""`kdplan profile`: measure this machine with executor.bench under torchrun, fit a cluster profile.

Three steps, each a function: ``make_spec`` (what to measure: the models' layer shapes, message
sizes), ``measure`` (launch torchrun as a subprocess, stream its progress), ``fit_profile`` (raw
times -> ClusterFile: peak and efficiency curve per device, latency and bandwidth per link tier,
memory and host-copy bandwidth). The planner never imports torch; only the subprocess does.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError, KdplanError
from ..models import load_model_spec
from ..schema.cluster import (ClusterFile, ComputeEfficiency, FrameworkOverheads, GPUGroup, GPUSpec, HardwareFile,
                              Link, NodeSpec, Overheads, PeakCompute, Provenance)
from ..cost.compute import (PRECISION_BYTES, elementwise_s, head_elementwise_factor, loss_passes, loss_time,
                            matmul_efficiency)
from .fit import fit_compute, fit_fixed_costs, fit_link, fit_loss, fit_op_factors, fit_per_item
from .shapes import bench_spec

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Mode:
    """How thorough a profile is: --tiny (tests), --quick (under a minute on 2 CPU cores), full."""

    tps: tuple[int, ...]
    sizes: tuple[int, ...]
    ops: tuple[str, ...]
    cpu_gflop: float  # largest GEMM on a CPU, after scaling the model down
    min_time_s: float  # per compute measurement
    comm_budget_bytes: int  # repetitions of a collective = budget / size (2..20)
    memory_bytes: int


ALL_OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
MODES = {
    "tiny": Mode((1,), (4 * KiB, 256 * KiB, 4 * MiB), ("all_reduce", "send_recv"), 0.03, 0.01,
                 8 * MiB, 16 * MiB),
    "quick": Mode((1, 2), tuple(KiB * 4**i for i in range(8)), ALL_OPS, 0.25, 0.03, 32 * MiB, 64 * MiB),
    "full": Mode((1, 2, 4, 8), tuple(KiB * 4**i for i in range(10)), ALL_OPS, 2.0, 0.2, 512 * MiB,
                 256 * MiB),
}


def has_cuda() -> bool:
    """Without importing torch: a CUDA machine has nvidia-smi."""
    return shutil.which("nvidia-smi") is not None


def gpu_count() -> int | None:
    """GPUs on this node from ``nvidia-smi -L`` (no torch here); None when it cannot tell. Honours
    CUDA_VISIBLE_DEVICES when it lists devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "all"):
        return len([d for d in visible.split(",") if d.strip()])
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    n = sum(1 for ln in r.stdout.splitlines() if ln.startswith("GPU "))
    return n if r.returncode == 0 and n > 0 else None


def make_spec(models: list[str], mode: str, dtypes: list[str], device: str) -> dict:
    m = MODES[mode]
    for d in dtypes:
        if d not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--dtype {d!r}: expected fp32, bf16 or fp16")
    specs = [load_model_spec(name) for name in models]
    cpu = device == "cpu"
    # On a CPU the layer shapes are scaled down to the mode's FLOP budget; a GPU measures them as is.
    seq, mb = (512, 1) if cpu else (2048, 1)
    spec = bench_spec(specs, tokens=seq * mb, micro_batch=mb, seq_len=seq, tps=list(m.tps),
                      budget_gflop=m.cpu_gflop if cpu else None)
    # The loss over the vocabulary (memory bound) at tensor sizes from cache-resident to memory
    # bound: 2-64 MiB per fp32 [tokens x V] tensor on a CPU, 4 MiB-1 GiB on a GPU (smaller ones
    # measure the per-call overhead, not the bandwidth).
    vocab = max(s.vocab_size for s in specs)
    exps = range(19, 25) if cpu else range(20, 29, 2)
    if mode == "tiny":
        exps = (15, 17)
    loss_tokens = sorted({max(8, 2**e // vocab) for e in exps})
    spec["loss"] = {"vocab": vocab, "tokens": loss_tokens, "passes": loss_passes(train=True, kd="dense")}
    # The teacher's top-k encoding at the ks plans use and each profiled model's vocabulary, on an
    # 8 MiB (CPU) / 256 MiB (GPU) tensor: its cost in passes depends on k / V (a partial sort).
    spec["topk"] = {"vocabs": sorted({s.vocab_size for s in specs}), "elements": 2**21 if cpu else 2**26,
                    "ks": [8, 64] if mode == "tiny" else [16, 64, 256, 1024]}
    # The student's loss per teacher-target kind (and the teacher's sampled encoding) at each
    # profiled model's own vocabulary, on the same 8 MiB / 256 MiB tensor as the top-k: on a CPU
    # log-softmax is bound by its exponentials and fresh temporaries by page faults, so the kinds
    # differ by more than their counted memory passes (GPUSpec.loss_passes, sample_passes).
    spec["loss_kinds"] = {"vocabs": spec["topk"]["vocabs"], "elements": spec["topk"]["elements"],
                          "kinds": ["dense", "sample:64"] if mode == "tiny" else list(LOSS_KIND_TARGETS),
                          "samples": 64}
    # The training step's head and loss at the micro-batch sizes plans choose, on a CPU only: a
    # cliff in micro-batch size (GPUSpec.loss_size_factor) and the host heap the step leaves
    # resident (loss_heap_copies); a GPU's loss curve over sizes is spec["loss"]'s. The smallest
    # model's vocabulary, 1, 2, 4, 8 (--tiny: 1, 2) sequences of up to 128 tokens, fewer where the
    # vocabulary is large (at most 2 MiB of logits per sequence; --tiny 128 KiB): the tiny example
    # (V = 8,192) at 4-32 MiB of fp32 logits, where glibc's largest mmap threshold sits. Its hidden
    # size, at most 512 (the head's matmuls at a large model's width would take the budget).
    smallest = min(specs, key=lambda s: s.layer_params() * s.num_layers + s.embedding_params())
    if cpu:
        per_seq = 2**15 if mode == "tiny" else 2**19  # logits elements
        seq_hl = max(8, min(128, per_seq // smallest.vocab_size))
        tokens_hl = [seq_hl * m for m in ((1, 2) if mode == "tiny" else (1, 2, 4, 8))]
        # the other teacher-target kinds' heaps differ (this machine, 8 MiB, 2026-12-05: dense 18-20,
        # topk:64 12-13, sample:64 10-12, none 9-10 logits copies): each at the second size
        # --tiny: the time curve only (each heap probe is a fresh Python process importing torch)
        spec["head_loss"] = {"hidden": min(smallest.hidden_size, 512), "vocab": smallest.vocab_size,
                             "tokens": tokens_hl, "kind_tokens": tokens_hl[1], "heap": mode != "tiny",
                             "kinds": [] if mode == "tiny" else [k for k in LOSS_KIND_TARGETS if k != "dense"]}
    # Framework fixed costs (kdplan.cost.overhead): the smallest model's blocks at a few tiny
    # token counts, 1 and 3 blocks, plain / forward-only / TP / FSDP2; AdamW over 8 and 64 tensors.
    small = overhead_proxy(smallest)
    spec["overheads"] = {"model": small.model_dump(mode="json"), "layers": [1, 3],
                         "tokens": [8, 16] if mode == "tiny" else [16, 32, 64],
                         "optimizer_tensors": [8, 64], "optimizer_elements": 1024,
                         # the block's op-by-op elementwise work at two batch sizes of one sequence
                         # (Overheads.eager_elementwise_passes); on a CPU only: a GPU's proxy-sized
                         # block is launch bound, and its passes come from `kdplan validate --fit`
                         **({"block_batches": [1, 2] if mode == "tiny" else [1, 4], "block_seq": 128 if mode == "tiny" else 256}
                            if cpu else {}),
                         # and over 8 large tensors: the update's achieved memory bandwidth
                         # (Overheads.optimizer_bytes_per_s_fraction), 16 MiB of fp32 each (GPU: 64)
                         "optimizer_large_elements": 2**16 if mode == "tiny" else 2**22 if not cpu else 2**20}
    # The copy that measures memory bandwidth: on a GPU at least 1 GiB (20x an H200's 50 MB L2;
    # a 64 MiB copy takes ~30 us there, not far from a launch), the mode's size on a CPU.
    memory_bytes = m.memory_bytes if cpu else max(m.memory_bytes, 1 << 30)
    spec.update(dtypes=dtypes, sizes=list(m.sizes), ops=list(m.ops), min_time_s=m.min_time_s,
                comm_budget_bytes=m.comm_budget_bytes, memory_bytes=memory_bytes, device=device)
    return spec


# What the profile measures the student's loss against, per GPUSpec.loss_passes kind: plain
# training, dense logits, top-k and sampled targets at the k / N plans use most (the loss's own
# cost barely depends on them: a gather of k columns beside passes over V).
LOSS_KIND_TARGETS = ("none", "dense", "topk:64", "sample:64")


def measure(spec: dict, nproc: int, on_progress: Callable[[int, int, str], None] | None = None,
            timeout_s: float = 3600) -> dict:
    """Run executor.bench.run under torchrun (argv list, no shell) and return its raw JSON."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="kdplan-profile-") as tmp:
        spec_path, raw_path, log_path = Path(tmp, "spec.json"), Path(tmp, "raw.json"), Path(tmp, "stderr.log")
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "executor.bench.run", "--spec", str(spec_path), "--out", str(raw_path)]
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=root)
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    if line.startswith("PROGRESS ") and on_progress:
                        done, total, label = line.split(" ", 3)[1:]
                        on_progress(int(done), int(total), label.strip())
                rc = proc.wait(timeout=timeout_s)
            except BaseException:
                proc.kill()
                raise
        if rc != 0 or not raw_path.exists():
            tail = [ln for ln in log_path.read_text().splitlines() if ln.strip()][-3:]
            raise KdplanError(f"profiling failed (torchrun exit {rc}): {' | '.join(tail)}")
        return json.loads(raw_path.read_text())


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: measured numbers span 1e-6 .. 1e4 and keep their precision."""
    return float(f"{x:.{digits}g}")


def _peak_tflops(raw: dict) -> dict[str, float]:
    """Best measured GEMM throughput per dtype (TFLOP/s): the device's achievable peak."""
    best: dict[str, float] = {}
    for g in raw["gemms"]:
        best[g["dtype"]] = _sig(max(best.get(g["dtype"], 0.0), g["flops"] / g["time_s"] / 1e12))
    return best


def fit_profile(raw: dict, *, name: str, gpu_name: str, gpus_per_node: int, host_memory_gib: float,
                command: str, base: "ClusterFile | None" = None, base_gpu: GPUSpec | None = None) -> tuple[ClusterFile, GPUSpec]:
    """Raw measurements -> (cluster file, GPU spec). With a datasheet ``base`` (provenance kind
    datasheet, no placeholders), its peaks and link bandwidths are kept and the fit gives
    efficiencies against them; otherwise (no base, or a base that was itself measured or is a
    placeholder: only its structure and names are used) the best measured GEMM is the peak and
    the fitted bandwidth is the link's."""
    meta = raw["meta"]
    measured = _peak_tflops(raw)
    if not measured:
        raise KdplanError("profile measured no matrix multiplies")
    datasheet = (base is not None and base.provenance.kind == "datasheet" and not base.placeholder
                 and base_gpu is not None and not base_gpu.placeholder)
    if datasheet:
        peak = base_gpu.peak
        peak_src = f"datasheet peaks of {base_gpu.name}"
    else:
        fallback = measured.get("bf16") or measured.get("fp16") or measured["fp32"]
        peak = PeakCompute(bf16_tflops=measured.get("bf16", fallback), fp16_tflops=measured.get("fp16", measured.get("bf16", fallback)),
                           fp32_tflops=measured.get("fp32", fallback))
        missing = sorted({"fp32", "bf16", "fp16"} - set(measured))
        peak_src = "best measured GEMM per dtype" + (f" ({', '.join(missing)} not measured: copied from bf16/fp32)" if missing else "")
    peak_of = {"fp32": peak.fp32_tflops, "bf16": peak.bf16_tflops, "fp16": peak.fp16_tflops}
    mem = raw["memory"]
    mem_bw = mem["bytes_moved"] / mem["time_s"] / 1e9
    cpu = meta["device_kind"] == "cpu"
    bg = base_gpu
    eff = _fit_efficiency(raw, peak_of, base_gpu.efficiency if base_gpu else ComputeEfficiency(),
                          _sig(mem_bw) if not datasheet else bg.memory_bandwidth_gb_per_s)
    gpu = GPUSpec(
        name=gpu_name, kind="cpu" if cpu else "gpu", peak=peak,
        memory_gib=round(bg.memory_gib if datasheet else (host_memory_gib / gpus_per_node if cpu else meta["device_memory_gib"]), 2),
        memory_bandwidth_gb_per_s=_sig(mem_bw) if not datasheet else bg.memory_bandwidth_gb_per_s,
        price_per_hour_usd=bg.price_per_hour_usd if bg else None, efficiency=eff,
        source=(f"kdplan profile on {meta['host']} ({meta['device']}, torch {meta['torch_version']}, "
                f"{meta['world_size']} processes x {meta['threads']} thread): peak = {peak_src}; memory "
                f"bandwidth = copy of {mem['bytes'] // MiB} MiB, {mem_bw:.1f} GB/s (read+write)"
                + ("; memory_gib = host memory / processes per node" if cpu and not datasheet else "")),
    )
    overheads = base.overheads if base else ClusterFile.model_fields["overheads"].default
    if raw.get("loss"):
        lf = fit_loss([x["elements"] for x in raw["loss"]], [x["time_s"] for x in raw["loss"]],
                      raw["loss"][0].get("passes") or loss_passes(train=True, kd="dense"),
                      gpu.memory_bandwidth_gb_per_s)
        gpu = gpu.model_copy(update=dict(
            cache_mib=_sig(lf.cache_mib), cache_bandwidth_gb_per_s=_sig(lf.cache_bandwidth_gb_per_s) if lf.cache_bandwidth_gb_per_s else None,
            source=gpu.source + (f"; loss over the vocabulary: {lf.points} sizes of the dense KD loss fitted (rms relative "
                                 f"error {lf.rms_error:.1%}), cache {lf.cache_mib:g} MiB")))
        overheads = overheads.model_copy(update={"loss_bytes_per_s_fraction": _sig(lf.bandwidth_fraction)})
    if raw.get("topk"):
        # In the cost model's own unit: one loss pass (compute.loss_time at the fitted loss
        # bandwidth and cache) over the same tensor, so pricing the encode reproduces its measured
        # time; without a loss measurement, one read pass (amax) of the tensor.
        frac = overheads.loss_bytes_per_s_fraction
        table: dict[int, dict[int, float]] = {}
        for x in raw["topk"]:
            unit = loss_time(gpu, x["tokens"] * x["vocab"], 1, frac) if raw.get("loss") else x["pass_s"]
            table.setdefault(int(x["vocab"]), {})[int(x["k"])] = _sig(x["time_s"] / unit)
        unit_name = "loss passes (the fitted loss bandwidth)" if raw.get("loss") else "read passes"
        gpu = gpu.model_copy(update=dict(topk_passes=table, source=gpu.source + (
            f"; teacher top-k encoding on 8 MiB of fp32 logits, in {unit_name}: " + "; ".join(
                f"V={v}: " + ", ".join(f"k={k} {p:g}" for k, p in t.items()) for v, t in table.items()))))
    if raw.get("loss_kinds") or raw.get("sample_encode"):
        gpu = _fit_loss_kinds(raw, gpu, overheads.loss_bytes_per_s_fraction)
    if len(raw.get("head_loss") or []) >= 2:
        gpu = fit_head_loss(raw["head_loss"], gpu, overheads.loss_bytes_per_s_fraction,
                            ref_elements=(raw.get("loss_kinds") or [{}])[0].get("elements"))
    if raw.get("overheads"):
        overheads = fit_framework(raw, overheads, gpu.memory_bandwidth_gb_per_s)
        overheads = fit_ddp_sync(raw.get("ddp_sync") or [], overheads)
    if len({x["tokens"] for x in raw.get("block_elementwise") or []}) >= 2:
        overheads = fit_block_ops(raw["block_elementwise"], overheads, gpu)
    overheads = _cpu_comm_overlap(meta, overheads)
    node = _fit_node(raw, gpu, gpus_per_node, host_memory_gib, mem_bw, base, datasheet)
    no_links = not any(c["tier"] == "intra_node" for c in raw["collectives"])
    prov = Provenance(kind="profile", date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                      host=meta["host"], device=meta["device"], torch_version=meta["torch_version"], command=command,
                      notes=(f"{meta['backend']}, {meta['world_size']} processes, OMP_NUM_THREADS={meta['threads']}"
                             + (f"; load average {meta['loadavg'][0]:.1f} before, {meta['loadavg'][1]:.1f} after"
                                " (other work on the machine inflates times)" if meta.get("loadavg") else "")
                             + (f"; fp32 matmuls {meta['fp32_matmul']} ('high' = TF32, as the GPU datasheet fp32 peaks)"
                                if meta.get("fp32_matmul") and not cpu else "")
                             + (f"; {meta['timer']}" if meta.get("timer") else "")
                             + (f"; {meta['host_memory']}" if meta.get("host_memory") else "")
                             + ((f"; links not measured (1 process): kept from {base.name}" if base is not None else
                                 "; links not measured (1 process) and no base: stand-ins, the file is a placeholder")
                                if no_links else "")))
    cluster = ClusterFile(name=name, description=(base.description if base else f"{name}: measured by kdplan profile"),
                          groups=[GPUGroup(node=node, num_nodes=base.groups[0].num_nodes if base else 1)],
                          overheads=overheads, provenance=prov, placeholder=no_links and base is None)
    return cluster, gpu


def _fit_loss_kinds(raw: dict, gpu: GPUSpec, frac: float) -> GPUSpec:
    """raw["loss_kinds"] / raw["sample_encode"] -> GPUSpec.loss_passes / sample_passes: each
    measured time over one loss pass of the cost model (compute.loss_time at the fitted loss
    bandwidth and cache) on the same tensor, so pricing them reproduces the measurement."""
    loss: dict[int, dict[str, float]] = {}
    for x in raw.get("loss_kinds") or []:
        unit = loss_time(gpu, x["elements"], 1, frac)
        loss.setdefault(int(x["vocab"]), {})[x["kind"]] = _sig(x["time_s"] / unit)
    sample = {int(x["vocab"]): _sig(x["time_s"] / loss_time(gpu, x["elements"], 1, frac))
              for x in raw.get("sample_encode") or []}
    txt = "; ".join(f"V={v}: " + ", ".join(f"{k} {p:g}" for k, p in t.items()) for v, t in loss.items())
    if sample:
        txt += "; teacher sample:64 encoding " + ", ".join(f"V={v}: {p:g}" for v, p in sample.items())
    return gpu.model_copy(update=dict(loss_passes=loss, sample_passes=sample, source=gpu.source + (
        "; the student's loss (forward, checkpointed recompute, backward) per teacher-target kind on 8 MiB of fp32 "
        f"logits, in loss passes: {txt}")))


# Collectives one block issues per training micro-batch, beyond the plain block: Megatron TP
# all-reduces 2 in the forward and 2 in the backward; FSDP2 (zero 3) all-gathers its weights for
# the forward and the backward and reduce-scatters its gradients. Their latency is the links'
# (latency_us), so the smallest measured message of each kind is taken out of the fixed cost.
TP_BLOCK_COLLECTIVES = {"all_reduce": 4}
FSDP_UNIT_COLLECTIVES = {"all_gather": 2, "reduce_scatter": 1}


def _smallest_collective_s(raw: dict, op: str) -> float:
    """Time of the smallest measured message of ``op`` on the intra-node tier (0: none measured)."""
    c = [x for x in raw.get("collectives", []) if x["tier"] == "intra_node" and x["op"] == op]
    return min(c, key=lambda x: x["bytes"])["time_s"] if c else 0.0


PROXY_HIDDEN, PROXY_HEAD_DIM, PROXY_VOCAB = 256, 64, 8192


def overhead_proxy(spec: ModelSpec) -> ModelSpec:
    """The model the framework overheads are measured on: ``spec``'s architecture (family, norms,
    gating, GQA ratio, q/k norms, soft-capping) at widths small enough that no width-dependent
    cost hides in the intercepts: hidden <= 256 (64-wide heads), vocabulary <= 8,192. A 1B
    model's blocks and 128K-token head at 16 tokens cost a fixed ~0.1-1 s per micro-batch in
    weight-gradient writes alone (memory traffic the byte terms price), which a fit over tokens
    would book as "framework" time for every model; the fixed costs wanted here (Python,
    dispatch, hooks, kernel launches) do not depend on width. Mixture-of-experts and MLA models
    keep their widths (their expert / latent shapes have no such simple scaling)."""
    if spec.moe is not None or spec.mla is not None:
        return spec
    h = min(spec.hidden_size, PROXY_HIDDEN)
    heads = max(1, h // PROXY_HEAD_DIM)
    ratio = max(1, spec.num_heads // spec.num_kv_heads)
    kv = max(1, heads // ratio)
    while heads % kv:
        kv -= 1
    scale = h / spec.hidden_size
    return spec.model_copy(update=dict(
        name=f"{spec.name} (overhead proxy)", hidden_size=h, num_heads=heads, num_kv_heads=kv,
        head_dim=None if spec.head_dim is None else h // heads,
        ffn_hidden_size=max(8, int(round(spec.ffn_hidden_size * scale / 8)) * 8),
        vocab_size=min(spec.vocab_size, PROXY_VOCAB)))


def fit_optimizer(opt: list[dict], memory_bandwidth_gb_per_s: float) -> tuple[float | None, float | None, list[str]]:
    """AdamW steps (executor.bench: ``tensors`` x ``elements``) -> (seconds per parameter tensor,
    the update's achieved share of the memory bandwidth at 30 B per parameter
    (cost.compute.optimizer_time), notes); None where not measured. The per-tensor slope comes
    from the steps over small tensors; the share from the largest step, less its fixed costs."""
    small = [o for o in opt if o["elements"] == opt[0]["elements"]] if opt else []
    if len({o["tensors"] for o in small}) < 2:
        return None, None, []
    fixed, per = fit_per_item([o["tensors"] for o in small], [o["time_s"] for o in small])
    notes = [f"AdamW over {', '.join(str(o['tensors']) for o in small)} tensors of {small[0]['elements']} elements: "
             f"slope {per * 1e6:.1f} us per tensor"]
    big = [o for o in opt if o["elements"] > small[0]["elements"]]
    frac = None
    if big and memory_bandwidth_gb_per_s:
        o = big[-1]
        work = o["time_s"] - fixed - per * o["tensors"]
        if work > 0:
            frac = min(1.0, 30.0 * o["tensors"] * o["elements"] / work / (memory_bandwidth_gb_per_s * 1e9))
            notes.append(f"AdamW over {o['tensors']} tensors of {o['elements']} elements: {work * 1e3:.3g} ms beyond "
                         f"the fixed costs, 30 B per parameter at {frac:.3g} of the memory bandwidth")
    return per, frac, notes


def fit_framework(raw: dict, overheads: Overheads, memory_bandwidth_gb_per_s: float = 0.0) -> Overheads:
    """raw["overheads"] / raw["optimizer"] (executor.bench: real blocks at tiny token counts) ->
    the framework's fixed costs: the per-block intercept of plain training is layer_overhead_s,
    the rest go to Overheads.framework (kdplan.cost.overhead prices them). An AdamW step over
    large tensors gives the update's achieved share of ``memory_bandwidth_gb_per_s``
    (optimizer_bytes_per_s_fraction)."""
    by: dict[str, list[dict]] = {}
    for x in raw["overheads"]:
        by.setdefault(x["variant"], []).append(x)
    fits = {v: fit_fixed_costs(xs) for v, xs in by.items()}
    if "train" not in fits:
        raise KdplanError("profile measured no training micro-batch for the framework overheads")
    tr = fits["train"]

    def extra(v: str, coll: dict[str, int]) -> float:
        if v not in fits:
            return 0.0
        # Wall or device time includes the collectives' latency; a CPU's process time does not
        # (waiting on the other rank is not CPU time).
        cpu_time = all(x.get("clock") == "process_time" for x in by[v])
        lat = 0.0 if cpu_time else sum(n * _smallest_collective_s(raw, op) for op, n in coll.items())
        return max(0.0, fits[v].block_s - tr.block_s - lat)

    fw = dict(micro_batch_s=_sig(tr.micro_batch_s),
              forward_micro_batch_s=_sig(fits["forward"].micro_batch_s) if "forward" in fits else 0.0,
              tp_block_s=_sig(extra("tp", TP_BLOCK_COLLECTIVES)), fsdp_unit_s=_sig(extra("fsdp", FSDP_UNIT_COLLECTIVES)))
    notes = []
    per, frac, opt_notes = fit_optimizer(raw.get("optimizer") or [], memory_bandwidth_gb_per_s)
    if per is not None:
        fw["optimizer_tensor_s"] = _sig(per)
    update = {"optimizer_bytes_per_s_fraction": _sig(frac)} if frac is not None else {}
    notes += opt_notes
    x0 = raw["overheads"][0]
    fit_txt = "; ".join(f"{v}: per micro-batch {f.micro_batch_s * 1e3:.3g} ms, per block {f.block_s * 1e3:.3g} ms "
                        f"(rms {f.rms_error:.0%}, {f.points} points)" for v, f in fits.items())
    src = (f"kdplan profile: the intercepts at 0 tokens of T = a + b n + L (c + d n) over L = "
           f"{sorted({x['layers'] for x in raw['overheads']})} blocks, n = {sorted({x['tokens'] for x in raw['overheads']})} "
           f"tokens of the executor's own stage (training: forward + dense KD loss + backward), {x0['ranks']} ranks; "
           f"{fit_txt}; tp / fsdp: per-block extra over plain training, less the smallest measured "
           f"collective's time per collective where the clock counts waits (links price it)" + ("; " + "; ".join(notes) if notes else ""))
    fw["source"] = src
    return overheads.model_copy(update={"layer_overhead_s": _sig(tr.block_s),
                                        "framework": FrameworkOverheads(**fw), **update})


def fit_ddp_sync(samples: list[dict], overheads: Overheads) -> Overheads:
    """raw["ddp_sync"] (executor.bench Bench.ddp_sync: the executor's stage under DDP, one micro-
    batch that synchronises and one under no_sync, and a flat all-reduce of the same gradient
    bytes) -> FrameworkOverheads.ddp_sync_byte_s: what synchronising costs beyond the all-reduce
    the links price, per gradient byte (sum over the samples of the excess, over their bytes: the
    reducer's copies into its buckets and back and the comm hook's averaging scale with the bytes,
    and the stages measured differ too little in bytes to fit a fixed part apart). On a GPU the
    CUDA-event clock of the all-reduce counts its wait too, so the excess is what remains."""
    if not samples:
        return overheads
    excess = [max(0.0, x["sync_s"] - x["no_sync_s"] - x["allreduce_s"]) for x in samples]
    rate = sum(excess) / sum(x["grad_bytes"] for x in samples)
    fw = overheads.framework
    pts = ", ".join(f"{x['layers']} blocks {x['grad_bytes'] / 2**20:.1f} MiB: {x['sync_s'] * 1e3:.3g} - "
                    f"{x['no_sync_s'] * 1e3:.3g} - {x['allreduce_s'] * 1e3:.3g} ms" for x in samples)
    note = (f"ddp_sync_byte_s: a DDP micro-batch that synchronises less one under no_sync less the flat all-reduce of "
            f"its gradients ({pts}): {rate * 1e9:.3g} ns per gradient byte")
    fw = fw.model_copy(update={"ddp_sync_byte_s": _sig(rate), "source": "; ".join(filter(None, [fw.source, note]))})
    return overheads.model_copy(update={"framework": fw})


def _cpu_comm_overlap(meta: dict, overheads: Overheads) -> Overheads:
    """On a CPU whose cores are all taken by the ranks' compute threads (processes per node x
    threads >= cores), gloo's communication thread has no core of its own: DDP's bucketed
    all-reduce launched during the backward runs between the compute, not under it, so the
    gradient reduction is priced whole (Overheads.overlap_grad_reduce false). Measured on the tiny
    plan (benchmarks/step_phases.py, 2 processes x 1 thread on 2 cores): the all-reduce takes
    ~16 ms of a step where the overlapped price exposed ~4 ms. A GPU's NCCL kernels run on their
    own stream and SMs, and a CPU with spare cores overlaps: both keep the base's setting."""
    if meta.get("device_kind") != "cpu" or not meta.get("cores"):
        return overheads
    busy = int(meta.get("local_world_size") or meta.get("world_size") or 1) * int(meta.get("threads") or 1)
    if busy < int(meta["cores"]):
        return overheads
    fw = overheads.framework
    note = (f"overlap_grad_reduce false: {busy} compute threads on {meta['cores']} cores leave gloo's "
            "communication thread no core of its own")
    fw = fw.model_copy(update={"source": (fw.source + "; " if fw.source else "") + note})
    return overheads.model_copy(update={"overlap_grad_reduce": False, "framework": fw})


def fit_head_loss(samples: list[dict], gpu: GPUSpec, loss_fraction: float, ref_elements: float | None = None) -> GPUSpec:
    """raw["head_loss"] (executor.bench: the training step's head and KD loss at several
    micro-batch sizes, dense, and the other target kinds at one size) -> GPUSpec.loss_size_factor
    and, where the heap was measured (a CPU), loss_heap_copies. Each dense sample's time over its
    price in the cost model's own terms (the head's three matmuls, compute.logits_time's, times
    compute.head_elementwise_factor, and compute.loss_time at the dense KD loss's passes), normalised to 1 at
    ``ref_elements`` (where loss_passes were measured; default the smallest sample): the curve is
    the size dependence the price misses, the scale stays the other terms'. The heap in fp32
    logits copies, by kind and size: heap bytes / (4 x elements)."""
    from ..cost.compute import matmul_time
    pts = sorted((x for x in samples if x.get("kind", "dense") == "dense"), key=lambda x: x["elements"])
    if len(pts) < 2:
        raise KdplanError("profile measured the head and loss at fewer than two dense sizes")

    def ratio(x: dict) -> float:
        head = 3 * matmul_time(gpu, "fp32", x["tokens"], x["vocab"], x["hidden"]) * head_elementwise_factor(gpu)
        loss = loss_time(gpu, x["elements"], loss_passes(train=True, kd="dense", gpu=gpu, vocab=x["vocab"]), loss_fraction)
        return x["time_s"] / (head + loss)

    mib = lambda e: _sig(e * 4.0 / 2**20)  # noqa: E731
    ref = min(pts, key=lambda x: abs(math.log(x["elements"] / ref_elements))) if ref_elements else pts[0]
    factor = {mib(x["elements"]): _sig(ratio(x) / ratio(ref)) for x in pts}
    heap: dict[str, dict[float, float]] = {}
    for x in sorted(samples, key=lambda x: x["elements"]):
        if x.get("heap_bytes") is not None:
            heap.setdefault(x.get("kind", "dense"), {})[mib(x["elements"])] = _sig(x["heap_bytes"] / (4.0 * x["elements"]))
    src = (f"; head and dense KD loss at {', '.join(str(x['tokens']) for x in pts)} tokens x V={pts[0]['vocab']} "
           f"(h {pts[0]['hidden']}): time over price, 1 at {mib(ref['elements']):g} MiB: "
           + ", ".join(f"{k:g} MiB {v:g}" for k, v in factor.items())
           + (("; host heap kept by that step (a fresh process's peak RSS growth) in logits copies: "
               + "; ".join(f"{kind}: " + ", ".join(f"{k:g} MiB {v:g}" for k, v in c.items()) for kind, c in heap.items()))
              if heap else ""))
    return gpu.model_copy(update=dict(loss_size_factor=factor, loss_heap_copies=heap if gpu.kind == "cpu" else {},
                                      source=gpu.source + src))


def fit_block_ops(samples: list[dict], overheads: Overheads, gpu: GPUSpec) -> Overheads:
    """raw["block_elementwise"] (executor.bench: the executor's own block, forward, at two token
    counts, with its Linear layers and SDPA timed apart) -> Overheads.block_ops "eager" and
    eager_elementwise_passes. The executor runs Hugging Face modeling code op by op, so a block
    costs more than its matmuls, attention core and the fused elementwise share the efficiency
    prices (elementwise_bandwidth_fraction, from F.rms_norm / SiLU micro-benchmarks): the
    per-token growth of what is left (block - linears - attention; fixed per-block costs cancel
    in the difference, layer_overhead_s prices them) less the fused share, in passes of the
    compute dtype over b*s*(h + f) at the memory bandwidth, as cost.compute.layer_time prices
    them (twice that in the backward). Provenance: appended to Overheads.framework.source."""
    from ..cost.memory import active_ffn_width
    from ..schema.model import ModelSpec
    lo, hi = min(samples, key=lambda x: x["tokens"]), max(samples, key=lambda x: x["tokens"])
    spec = ModelSpec.model_validate(hi["model"])
    dn = hi["tokens"] - lo["tokens"]
    mm = lambda x: x["linear_s"] + x["attention_s"]  # noqa: E731
    rest = lambda x: x["block_s"] - mm(x)  # noqa: E731
    prec = {4: "fp32", 2: "bf16"}.get(hi["bytes"], "bf16")

    def fused(x: dict) -> float:  # the fused share cost.compute.elementwise_s prices at this sample's tokens
        return elementwise_s(spec, gpu, prec, tokens=x["tokens"], tp=1, block_gemm_s=x["linear_s"])

    fused_per_token = (fused(hi) - fused(lo)) / dn
    per_token = (rest(hi) - rest(lo)) / dn - fused_per_token
    width = spec.hidden_size + active_ffn_width(spec)
    pass_s = width * hi["bytes"] / (gpu.memory_bandwidth_gb_per_s * 1e9)  # one pass, per token
    passes = _sig(min(1e4, max(0.0, per_token / pass_s)))
    src = (f"kdplan profile: the executor's block ({spec.name}, h {spec.hidden_size}, f {active_ffn_width(spec):g}), "
           f"forward at {lo['tokens']} and {hi['tokens']} tokens: {lo['block_s'] * 1e3:.3g} / {hi['block_s'] * 1e3:.3g} ms, "
           f"of which linears {lo['linear_s'] * 1e3:.3g} / {hi['linear_s'] * 1e3:.3g} ms and SDPA "
           f"{lo['attention_s'] * 1e3:.3g} / {hi['attention_s'] * 1e3:.3g} ms; the rest grows "
           f"{(rest(hi) - rest(lo)) / dn * 1e9:.4g} ns per token, {per_token * 1e9:.4g} ns beyond the fused share "
           f"({fused_per_token * 1e9:.4g} ns, cost.compute.elementwise_s): {passes:g} passes of {hi['bytes']} B over h + f at the memory bandwidth")
    fw = overheads.framework  # its source holds the provenance of every measured executor cost
    fw = fw.model_copy(update={"source": (fw.source + "; " if fw.source else "") + "eager_elementwise_passes: " + src})
    return overheads.model_copy(update={"block_ops": "eager", "eager_elementwise_passes": passes, "framework": fw})


# Elements (x k, x n) one elementwise micro-benchmark sample reads plus writes per row (_fit_efficiency).
ELEMENTWISE_BENCH_ELEMENTS = (10, 5)


def _fit_efficiency(raw: dict, peak_of: dict[str, float], base_eff: ComputeEfficiency,
                    memory_bandwidth_gb_per_s: float) -> ComputeEfficiency:
    """The device's efficiency curve, attention fraction and elementwise bandwidth share."""
    # One efficiency curve per device: fitted on the first dtype measured (the one plans compute
    # in: fp32 on a CPU, bf16 on a GPU); the other dtypes only contribute their peaks.
    primary = raw["gemms"][0]["dtype"]
    gm = [g for g in raw["gemms"] if g["dtype"] == primary]
    cf = fit_compute([g["flops"] for g in gm], [g["time_s"] for g in gm], [peak_of[g["dtype"]] * 1e12 for g in gm],
                     [min(g["m"], g["k"], g["n"]) for g in gm])
    curve = ComputeEfficiency(max_fraction=cf.max_fraction, half_saturation_gflop=cf.half_saturation_gflop,
                              min_dim_saturation=cf.min_dim_saturation)
    # The cost model prices the attention core at attention_fraction * (the per-head matmul's size
    # and head-dim efficiency) / max_fraction; invert that, so the profile reproduces the measurement.
    attn = [a["flops"] / a["time_s"] / (peak_of[a["dtype"]] * 1e12) * cf.max_fraction
            / matmul_efficiency(curve, a["flops"] / a["heads"] / a["batch"], a["head_dim"])
            for a in raw["attention"] if a["dtype"] == primary]
    # Elementwise kernels' share of the memory bandwidth: each sample (executor.bench Bench.elementwise,
    # on one layer's [m, k] and [m, n] activations) runs two RMSNorms (read k, write k) and two
    # residual adds (read 2k, write k) over [m, k], then SiLU (read n, write n) and a product
    # (read 2n, write n) over [m, n]: m * (10 k + 5 n) elements.
    shares = [e["m"] * (ELEMENTWISE_BENCH_ELEMENTS[0] * e["k"] + ELEMENTWISE_BENCH_ELEMENTS[1] * e["n"])
              * PRECISION_BYTES[e["dtype"]] / e["time_s"] / (memory_bandwidth_gb_per_s * 1e9)
              for e in raw["elementwise"] if e["dtype"] == primary and e["time_s"] > 0]
    return base_eff.model_copy(update=dict(
        max_fraction=_sig(cf.max_fraction), half_saturation_gflop=_sig(cf.half_saturation_gflop),
        min_dim_saturation=cf.min_dim_saturation,
        attention_fraction=_sig(min(1.0, max(1e-4, statistics.median(attn)))) if attn else base_eff.attention_fraction,
        **(dict(elementwise_bandwidth_fraction=_sig(min(10.0, statistics.median(shares))),
                elementwise_overhead_fraction=None) if shares else {}),
        source=(f"kdplan profile: {cf.points} {primary} GEMMs fitted (rms relative error {cf.rms_error:.1%}); attention "
                f"{len(attn)} SDPA samples (full-mask FLOPs); elementwise = median share of the memory bandwidth "
                f"({memory_bandwidth_gb_per_s:.4g} GB/s) of norms + activation + residual adds over {len(shares)} samples")))


def _fit_node(raw: dict, gpu: GPUSpec, gpus_per_node: int, host_memory_gib: float, mem_bw: float,
              base: ClusterFile | None, datasheet: bool) -> NodeSpec:
    bnode = base.groups[0].node if base else None
    links: dict[str, Link] = {}
    for tier in ("intra_node", "inter_node"):
        samples = [c for c in raw["collectives"] if c["tier"] == tier]
        ref = getattr(bnode, tier) if bnode else None
        if not samples:
            continue
        fit = fit_link(samples)
        factors = fit_op_factors(samples, fit)
        ops = sorted({c["op"] for c in samples})
        k = samples[0]["nranks"]
        src = (f"kdplan profile: {', '.join(ops)} over {k} ranks, {len(samples)} sizes "
               f"{min(c['bytes'] for c in samples) // KiB} KiB-{max(c['bytes'] for c in samples) // MiB} MiB, "
               f"fitted T = hops*latency + ring bytes/bandwidth (rms relative error {fit.rms_error:.0%})"
               + (f"; per-op bandwidth factors from samples >= 1 MiB: "
                  + ", ".join(f"{op} {f:g}" for op, f in factors.items()) if factors else ""))
        if ref is not None and datasheet:
            # datasheet bandwidth stays; the measurement says what fraction of it is achieved
            links[tier] = ref.model_copy(update=dict(latency_us=_sig(fit.latency_us), op_bandwidth_factor=factors,
                                                     efficiency=_sig(min(1.0, fit.bandwidth_gb_per_s / ref.bandwidth_gb_per_s)),
                                                     source=src + f"; bandwidth: {ref.source}"))
        else:
            links[tier] = Link(name=ref.name if ref else ("gloo" if gpu.kind == "cpu" else "nccl") + f" {tier}",
                               bandwidth_gb_per_s=_sig(fit.bandwidth_gb_per_s), latency_us=_sig(fit.latency_us),
                               efficiency=1.0, op_bandwidth_factor=factors, source=src + "; bandwidth is the achieved one (efficiency 1)")
    if "intra_node" not in links:
        # one process measures no collective (a one-GPU node): the links stay the base's, or
        # without a base a stand-in marked as such (the caller marks the whole file a placeholder)
        links.update(_unmeasured_links(bnode, base, mem_bw))
    if "inter_node" not in links:
        links["inter_node"] = bnode.inter_node if bnode and datasheet else links["intra_node"].model_copy(
            update=dict(name="none (single node)", source="not measured (single node): same as intra_node"))
    copies = raw.get("host_copy") or []
    if copies:
        hf = fit_link([dict(c, op="copy") for c in copies])
        host = Link(name=bnode.host.name if bnode else "PCIe", bandwidth_gb_per_s=_sig(hf.bandwidth_gb_per_s),
                    latency_us=_sig(hf.latency_us), efficiency=1.0,
                    source="kdplan profile: pinned host<->device copies (achieved bandwidth)")
    else:
        host = Link(name="memcpy" if gpu.kind == "cpu" else "host", bandwidth_gb_per_s=_sig(mem_bw / 2),
                    latency_us=bnode.host.latency_us if bnode else 10.0, efficiency=1.0,
                    source="kdplan profile: host memory copy (half the read+write copy bandwidth)")
    # Host copies are timed one GPU at a time: whether GPUs share a host uplink is the base's
    # (NodeSpec.gpus_per_host_link), not measured here.
    shared = min(bnode.gpus_per_host_link, gpus_per_node) if bnode else 1
    return NodeSpec(gpu=gpu.name, gpus_per_node=gpus_per_node, intra_node=links["intra_node"],
                    inter_node=links["inter_node"], host=host, gpus_per_host_link=shared, host_memory_gib=host_memory_gib,
                    source=(bnode.source if bnode else f"{gpus_per_node} processes per node, {host_memory_gib:.0f} GiB host memory"))


def _unmeasured_links(bnode: NodeSpec | None, base: ClusterFile | None, mem_bw: float) -> dict[str, Link]:
    """intra/inter-node links when no collective was measured (one process)."""
    if bnode is not None:
        why = f"not measured (kdplan profile ran 1 process): kept from the base cluster {base.name}"
        return {t: getattr(bnode, t).model_copy(update=dict(source=f"{why}; {getattr(bnode, t).source}"))
                for t in ("intra_node", "inter_node")}
    stand_in = Link(name="not measured (1 process)", bandwidth_gb_per_s=_sig(max(mem_bw / 2, 1e-3)), latency_us=10.0,
                    efficiency=1.0, source="not measured (kdplan profile ran 1 process, no --base): a stand-in "
                                           "of half the measured memory copy bandwidth; the profile is a placeholder")
    return {"intra_node": stand_in}


def base_files(name: str) -> tuple[ClusterFile, GPUSpec]:
    """A cluster preset or YAML as (cluster file without inline GPUs, its first group's GPU)."""
    from ..profiles import load_cluster
    cl = load_cluster(name)
    return ClusterFile(**cl.model_dump(exclude={"gpus"})), cl.gpu_of_group(0)


def host_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 16.0


def dump_yaml(obj) -> str:
    import yaml
    return yaml.safe_dump(obj.model_dump(mode="json", exclude_defaults=False), sort_keys=False, width=200,
                          allow_unicode=True)


def write_profile(out: str, cluster: ClusterFile, gpu: GPUSpec, hardware_out: str | None) -> None:
    """Write the cluster YAML; the GPU spec goes inline, or to its own hardware file if asked."""
    from ..io import write_atomic
    if hardware_out:
        write_atomic(hardware_out, dump_yaml(HardwareFile(gpu=gpu)))
    else:
        cluster = cluster.model_copy(update={"gpus": {gpu.name: gpu}})
    write_atomic(out, dump_yaml(cluster))
