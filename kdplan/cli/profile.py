"""kdplan profile: measure this machine or cluster and write a cluster profile."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import err, out, run_cli

_DEFAULT_MODELS = {"cpu": "gpt-1.3b,llama-3.2-1b", "gpu": "gpt-1.3b,gpt-13b,llama-3-8b"}


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        output: Annotated[Optional[str], typer.Option("-o", "--output", help="Cluster profile YAML to write.")] = "profile.yaml",
        quick: Annotated[bool, typer.Option("--quick", help="Fewer shapes and message sizes (up to 16 MiB); under a minute on 2 CPU cores.")] = False,
        tiny: Annotated[bool, typer.Option("--tiny", help="A few shapes and sizes only (for tests).")] = False,
        models: Annotated[Optional[str], typer.Option("--models", help="Comma-separated presets or config.json paths whose layer shapes to measure.")] = None,
        nproc: Annotated[int, typer.Option("--nproc", help="Processes (devices) to launch on this node; 1 measures compute and memory only and keeps the links of --base.", min=1, max=1024)] = 2,
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="Comma-separated dtypes to measure: fp32, bf16, fp16; the efficiency curve is fitted on the first (default fp32,bf16 on a CPU, bf16,fp32 on a GPU).")] = None,
        name: Annotated[Optional[str], typer.Option("--name", help="Cluster name (default: cpu-local on a CPU, else local-<gpu>).")] = None,
        gpu_name: Annotated[Optional[str], typer.Option("--gpu-name", help="Device type name in the profile (default: cpu-core or the base's).")] = None,
        base: Annotated[Optional[str], typer.Option("--base", help="Cluster preset or YAML to take structure, names and (unless a placeholder) datasheet peaks and link bandwidths from; the profile then fits efficiencies against them.")] = None,
        gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", help="Devices per node in the written profile (default: the base's, else --nproc).", min=1)] = None,
        hardware_out: Annotated[Optional[str], typer.Option("--hardware-out", help="Also write the device spec to this hardware YAML and reference it by name instead of inlining it.")] = None,
        raw: Annotated[Optional[str], typer.Option("--raw", help="Also keep the raw measurements (JSON) here.")] = None,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
        storage_dir: Annotated[Optional[str], typer.Option("--storage-dir", help="Directory whose file system to measure as a storage tier for the offline teacher-output cache (sequential write with fsync, read after dropping the page cache, free space); default: the output file's directory.")] = None,
        storage_tier: Annotated[str, typer.Option("--storage-tier", help="Which tier --storage-dir is: local (node-local NVMe, per node), shared (a file system all nodes share), or none (do not measure; keep the base's).")] = "local",
        storage_mib: Annotated[Optional[int], typer.Option("--storage-mib", help="MiB to write and read back (default 8 with --tiny, 256 with --quick, 1024 otherwise).", min=8, max=1_048_576)] = None,
    ):
        """Measure compute per layer shape, memory and collectives per link tier; write a cluster profile YAML."""
        run_cli(_profile, output, "tiny" if tiny else "quick" if quick else "full", models, nproc, dtype, name,
                gpu_name, base, gpus_per_node, hardware_out, raw, device, storage_dir, storage_tier, storage_mib)


def _profile(output, mode, models, nproc, dtype, name, gpu_name, base, gpus_per_node, hardware_out, raw, device,
             storage_dir=None, storage_tier="local", storage_mib=None):
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..calibrate import profile as prof
    from ..errors import InputError
    from ..io import write_atomic
    from ..profiles import load_cluster

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected auto, cpu or cuda")
    if storage_tier not in ("local", "shared", "none"):
        raise InputError(f"--storage-tier {storage_tier!r}: expected local, shared or none")
    if storage_tier == "none" and storage_dir:
        raise InputError("--storage-dir with --storage-tier none: say which tier the directory is (local or shared)")
    from pathlib import Path
    store_dir = Path(storage_dir) if storage_dir else Path(output).resolve().parent
    if storage_tier != "none" and not store_dir.is_dir():
        raise InputError(f"--storage-dir {store_dir}: not a directory")
    kind = ("gpu" if prof.has_cuda() else "cpu") if device == "auto" else ("gpu" if device == "cuda" else "cpu")
    if nproc == 1 and not base:
        raise InputError("--nproc 1 measures no collectives: give --base CLUSTER to keep its link bandwidths "
                         "(compute and memory are measured), or run --nproc 2 or more")
    if kind == "gpu":
        ngpu = prof.gpu_count()
        if ngpu is not None and nproc > ngpu:
            raise InputError(f"--nproc {nproc}: this node has {ngpu} GPU{'s' if ngpu != 1 else ''} and a GPU profile "
                             f"runs one process per GPU; use --nproc {ngpu}"
                             + (" --base CLUSTER (links kept from it)" if ngpu == 1 else ""))
    base_cluster = base_file = base_gpu = None
    if base:
        base_cluster = load_cluster(base)
        base_file, base_gpu = prof.base_files(base)
    model_list = [m.strip() for m in (models or _DEFAULT_MODELS[kind]).split(",") if m.strip()]
    if not model_list:
        raise InputError("--models is empty")
    dtype = dtype or ("fp32,bf16" if kind == "cpu" else "bf16,fp32")
    spec = prof.make_spec(model_list, mode, [d.strip() for d in dtype.split(",") if d.strip()],
                          "cpu" if kind == "cpu" else "cuda")
    with Progress(TextColumn("[bold]profile[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=False) as bar:
        task = bar.add_task("starting torchrun", total=None)
        measured = prof.measure(spec, nproc, lambda d, t, label: bar.update(task, completed=d, total=t, description=label))
    if raw:
        write_atomic(raw, json.dumps(measured, indent=1) + "\n")
    per_node = gpus_per_node or (base_cluster.groups[0].node.gpus_per_node if base_cluster else nproc)
    host_mem = base_cluster.groups[0].node.host_memory_gib if base_cluster else prof.host_memory_gib()
    cluster, gpu = prof.fit_profile(
        measured, name=name or (base_cluster.name if base_cluster else "cpu-local" if kind == "cpu" else "local-gpu"),
        gpu_name=gpu_name or (base_gpu.name if base_gpu else "cpu-core" if kind == "cpu" else "local-gpu"),
        gpus_per_node=per_node, host_memory_gib=host_mem, command=shlex.join(["kdplan", *sys.argv[1:]]),
        base=base_file, base_gpu=base_gpu)
    from ..calibrate.storage import measure_storage, with_storage
    if base_cluster is not None:  # the tiers this run does not measure stay the base's
        if base_cluster.shared_storage is not None:
            cluster = with_storage(cluster, base_cluster.shared_storage, shared=True)
        if base_cluster.groups[0].node.local_storage is not None:
            cluster = with_storage(cluster, base_cluster.groups[0].node.local_storage, shared=False)
    if storage_tier != "none":
        mib = storage_mib or {"tiny": 8, "quick": 256}.get(mode, 1024)
        with Progress(TextColumn("[bold]storage[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err, transient=False) as bar:
            task = bar.add_task("write", total=None)
            tier = measure_storage(store_dir, mib * 2**20,
                                   name="node-local storage" if storage_tier == "local" else "shared file system",
                                   progress=lambda d, t, label: bar.update(task, completed=d, total=t, description=label))
        cluster = with_storage(cluster, tier, shared=storage_tier == "shared")
    prof.write_profile(output, cluster, gpu, hardware_out)
    e, link = gpu.efficiency, cluster.groups[0].node.intra_node
    out.print(f"wrote {escape(str(output))}" + (f" and {escape(str(hardware_out))}" if hardware_out else ""))
    out.print(f"  peak {gpu.peak.fp32_tflops * 1e3:.1f} GFLOP/s fp32, {gpu.peak.bf16_tflops * 1e3:.1f} GFLOP/s bf16; "
              f"matmul efficiency max {e.max_fraction:.2f}, half at {e.half_saturation_gflop * 1e3:.2f} MFLOP; "
              f"attention {e.attention_fraction:.2f}; elementwise "
              + (f"at {e.elementwise_bandwidth_fraction:.2f} of the memory bandwidth" if e.elementwise_bandwidth_fraction is not None
                 else f"+{e.legacy_elementwise_fraction:.0%} of the matmuls"))
    measured_links = any(c["tier"] == "intra_node" for c in measured["collectives"])
    out.print(f"  memory {gpu.memory_bandwidth_gb_per_s:.1f} GB/s; {link.name}: latency {link.latency_us:.0f} us/hop, "
              f"{link.bandwidth_gb_per_s * link.efficiency:.3f} GB/s "
              + ("achieved" if measured_links else f"(not measured with 1 process: kept from {escape(str(base))})"))
    fw = cluster.overheads.framework
    out.print(f"  framework: {fw.micro_batch_s * 1e3:.2f} ms per micro-batch ({fw.forward_micro_batch_s * 1e3:.2f} forward "
              f"only), {cluster.overheads.layer_overhead_s * 1e3:.2f} ms per block, TP +{fw.tp_block_s * 1e3:.2f} ms per "
              f"block, FSDP +{fw.fsdp_unit_s * 1e3:.2f} ms per unit, {fw.optimizer_tensor_s * 1e6:.1f} us per optimizer tensor, "
              f"DDP synchronisation +{fw.ddp_sync_byte_s * 1e9:.2f} ns per gradient byte")
    if gpu.loss_size_factor:
        heap = gpu.loss_heap_copies.get("dense") or {}
        out.print("  head and loss by micro-batch logits size (time over price; resident heap in logits copies): "
                  + ", ".join(f"{k:g} MiB {v:.2f}x" + (f" / {heap[k]:.1f}" if k in heap else "")
                              for k, v in sorted(gpu.loss_size_factor.items())))
    if storage_tier != "none":
        out.print(f"  {storage_tier} storage {escape(str(store_dir))}: write {tier.write_gb_per_s:.2f} GB/s, "
                  f"read {tier.read_gb_per_s:.2f} GB/s, {tier.capacity_tb:.3f} TB free")
