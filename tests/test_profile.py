"""kdplan profile: the fit from raw measurements (no torch) and one real --tiny run under torchrun
whose profile loads and prices a layout."""

from __future__ import annotations

import pytest
import yaml

from kdplan.calibrate.fit import ring_terms
from kdplan.calibrate.profile import fit_profile, make_spec
from kdplan.calibrate.shapes import cpu_scale, layer_gemms
from kdplan.cost import Candidate, evaluate, matmul_efficiency
from kdplan.problem import Problem
from kdplan.models import preset
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import ClusterFile, ComputeEfficiency
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout


def test_layer_gemms_cover_forward_and_backward():
    spec = preset("llama-3-8b")
    gs = layer_gemms(spec, tokens=2048, tp=2)
    assert len(gs) == 15  # 5 matmuls x (fwd, dX, dW)
    up = [g for g in gs if " mlp_up " in g.label]
    assert {(g.m, g.k, g.n) for g in up} == {(2048, 4096, 14336), (2048, 14336, 4096), (4096, 2048, 14336)}
    qkv = next(g for g in gs if g.label.endswith("qkv fwd"))
    assert qkv.n == (32 + 2 * 8) * 128 // 2  # GQA: 8 KV heads, sharded over tp=2
    # CPU scaling brings the largest GEMM under the budget
    s = cpu_scale(spec, 2048, 0.25)
    assert max(g.flops for g in layer_gemms(spec, tokens=2048, scale=s)) < 0.25e9 * 1.1


def _synthetic_raw(eff: ComputeEfficiency, peak: float, alpha: float, bw: float) -> dict:
    gemms = []
    for m in (32, 128, 512):
        for n in (256, 1024, 4096):
            f = 2.0 * m * 512 * n
            gemms.append({"label": f"toy tp1 mlp_up fwd {m}x{n}", "m": m, "k": 512, "n": n, "dtype": "fp32",
                          "flops": f, "time_s": f / (peak * matmul_efficiency(eff, f, min(m, n, 512)))})
    coll = []
    for op in ("all_reduce", "send_recv"):
        for size in (2**12, 2**18, 2**24):
            hops, vol = ring_terms(op, 2, size)
            coll.append({"op": op, "tier": "intra_node", "nranks": 2, "bytes": size, "time_s": hops * alpha + vol / bw})
    return {"gemms": gemms, "attention": [], "elementwise": [], "collectives": coll, "host_copy": [],
            "memory": {"bytes": 2**26, "time_s": 0.01, "bytes_moved": 2**27},
            "meta": {"host": "testhost", "torch_version": "x", "backend": "gloo", "world_size": 2,
                     "local_world_size": 2, "threads": 1, "device": "cpu (test)", "device_kind": "cpu",
                     "device_memory_gib": None}}


def test_fit_profile_recovers_synthetic_machine():
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    raw = _synthetic_raw(eff, 80e9, 150e-6, 2.0e9)
    cluster, gpu = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8,
                               command="kdplan profile --test")
    assert gpu.efficiency.half_saturation_gflop == pytest.approx(0.02, rel=0.01)
    # peak = best measured GEMM, so the largest one is at max_fraction=1 relative to it
    assert gpu.peak.fp32_tflops * 1e12 <= 80e9
    link = cluster.groups[0].node.intra_node
    assert link.latency_us == pytest.approx(150, rel=1e-3)
    assert link.bandwidth_gb_per_s * link.efficiency == pytest.approx(2.0, rel=1e-3)
    assert gpu.memory_bandwidth_gb_per_s == pytest.approx(2**27 / 0.01 / 1e9, rel=1e-3)
    assert cluster.provenance.kind == "profile" and cluster.provenance.host == "testhost"
    ClusterFile.model_validate(cluster.model_dump())  # round-trips
    assert gpu.topk_passes == {}  # not measured: the GPU default prices it
    raw["topk"] = [{"tokens": 256, "vocab": 8192, "k": k, "time_s": p * 1e-4, "pass_s": 1e-4, "passes": p}
                   for k, p in ((16, 20.0), (1024, 225.0))]
    _, gpu = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8, command="x")
    assert gpu.topk_passes == {8192: {16: 20.0, 1024: 225.0}} and "V=8192: k=16 20, k=1024 225" in gpu.source


def test_make_spec_rejects_bad_dtype_and_model():
    from kdplan.errors import InputError
    with pytest.raises(InputError, match="fp8"):
        make_spec(["gpt-1.3b"], "tiny", ["fp8"], "cpu")
    with pytest.raises(InputError, match="unknown model preset"):
        make_spec(["gpt-999b"], "tiny", ["fp32"], "cpu")


def test_profile_cli_bad_input(kdplan_cli, tmp_path):
    r = kdplan_cli("profile", "--tiny", "--nproc", "1", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "--nproc" in r.stderr and "Traceback" not in r.stderr
    r = kdplan_cli("profile", "--tiny", "--dtype", "fp8", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "fp8" in r.stderr


def test_one_process_profile_keeps_the_base_links_and_says_so():
    """Issue 12 item 3: a one-GPU node measures no collective; the fit must not raise, keeps the
    links of the base and says so in the provenance; with no base the file is a placeholder."""
    from kdplan.calibrate.profile import base_files
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    raw = _synthetic_raw(eff, 80e9, 150e-6, 2.0e9)
    raw["collectives"] = []
    raw["meta"].update(world_size=1, local_world_size=1)
    base, base_gpu = base_files("dgx-h200")
    cluster, gpu = fit_profile(raw, name="h200-1gpu", gpu_name=base_gpu.name, gpus_per_node=8, host_memory_gib=2048,
                               command="kdplan profile --nproc 1", base=base, base_gpu=base_gpu)
    node, ref = cluster.groups[0].node, base.groups[0].node
    for tier in ("intra_node", "inter_node"):
        got, want = getattr(node, tier), getattr(ref, tier)
        assert got.bandwidth_gb_per_s == want.bandwidth_gb_per_s and got.latency_us == want.latency_us
        assert "not measured" in got.source and "dgx-h200" in got.source
    assert "links not measured (1 process): kept from dgx-h200" in cluster.provenance.notes
    assert not cluster.placeholder
    ClusterFile.model_validate(cluster.model_dump())
    cluster, _ = fit_profile(raw, name="x", gpu_name="x", gpus_per_node=1, host_memory_gib=8, command="x")
    assert cluster.placeholder and "no base" in cluster.provenance.notes
    assert "not measured" in cluster.groups[0].node.intra_node.source


def test_profile_cli_one_process_needs_a_base_and_one_gpu_per_process(kdplan_cli, tmp_path, monkeypatch):
    r = kdplan_cli("profile", "--tiny", "--nproc", "1", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "--base" in r.stderr and "Traceback" not in r.stderr
    # a fake nvidia-smi listing one GPU: 2 processes on it are refused before anything starts
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-x)'\n")
    (bin_ / "nvidia-smi").chmod(0o755)
    import os
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    r = kdplan_cli("profile", "--tiny", "--device", "cuda", "--nproc", "2", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "1 GPU" in r.stderr and "--nproc 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_profile_one_process_run_on_cpu(kdplan_cli, tmp_path):
    out = tmp_path / "p.yaml"
    r = kdplan_cli("profile", "--tiny", "--nproc", "1", "--base", "cpu-local", "--models", "llama-3.2-1b",
                   "--dtype", "fp32", "-o", out, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cl = load_cluster(str(out))
    assert "kept from cpu-local" in cl.provenance.notes and "not measured with 1 process" in " ".join(r.stdout.split())
    assert cl.groups[0].node.intra_node.bandwidth_gb_per_s == load_cluster("cpu-local").groups[0].node.intra_node.bandwidth_gb_per_s


@pytest.mark.slow
def test_profile_tiny_run_loads_and_prices(kdplan_cli, tmp_path):
    out, hw, raw = tmp_path / "p.yaml", tmp_path / "hw" / "dev.yaml", tmp_path / "raw.json"
    r = kdplan_cli("profile", "--tiny", "--nproc", "2", "--models", "llama-3.2-1b", "--dtype", "fp32",
                   "-o", out, "--raw", raw, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cl = load_cluster(str(out))
    gpu = cl.gpu_of_group(0)
    assert cl.provenance.kind == "profile" and "kdplan profile --tiny" in cl.provenance.command
    assert cl.provenance.torch_version and cl.provenance.host and not cl.placeholder
    assert 1e-4 < gpu.peak.fp32_tflops < 10  # a CPU core: 0.1 GFLOP/s .. 10 TFLOP/s
    assert 0 < gpu.efficiency.max_fraction <= 1
    link = cl.groups[0].node.intra_node
    assert 0 < link.latency_us < 1e5 and 1e-3 < link.bandwidth_gb_per_s < 1e3
    assert yaml.safe_load(out.read_text())["gpus"]  # self-contained: the device spec is inline
    store = cl.groups[0].node.local_storage  # the output directory's file system, measured
    assert store is not None and "measured by kdplan profile" in store.source and store.read_gb_per_s > 0
    # the teacher's top-k encoding is measured per k, in read passes (more than the one of amax)
    assert list(gpu.topk_passes) == [128256] and sorted(gpu.topk_passes[128256]) == [8, 64]
    assert all(p > 1 for p in gpu.topk_passes[128256].values())
    # the executor's own block beyond its matmuls (Hugging Face code, op by op): measured at two
    # token counts, priced as eager passes, with the measurement in the framework's provenance;
    # the run kept its freed host memory (executor.hostmem), as the executor does on a CPU
    import json
    blocks = json.loads(raw.read_text())["block_elementwise"]
    assert len({b["tokens"] for b in blocks}) == 2
    assert all(b["block_s"] > b["linear_s"] > 0 and b["attention_s"] > 0 for b in blocks)
    ov = cl.overheads
    assert ov.block_ops == "eager" and 0 <= ov.eager_elementwise_passes < 1e4
    assert "eager_elementwise_passes: kdplan profile" in ov.framework.source
    assert "glibc" in cl.provenance.notes or "mallopt" in cl.provenance.notes
    # DDP's synchronisation beyond the all-reduce, at each block count (2 ranks), in the provenance
    syncs = json.loads(raw.read_text())["ddp_sync"]
    assert sorted(x["layers"] for x in syncs) == [1, 3] and all(x["sync_s"] > 0 and x["grad_bytes"] > 0 for x in syncs)
    assert "ddp_sync_byte_s: a DDP micro-batch" in ov.framework.source
    # the training head and loss at two micro-batch sizes (a CPU): the time curve, 1 at the
    # reference size (--tiny measures no resident heap: tests/test_bench_head_loss.py does)
    assert len(gpu.loss_size_factor) == 2 and 1.0 in gpu.loss_size_factor.values()
    assert gpu.loss_heap_copies == {} and "time over price, 1 at 7.828 MiB" in gpu.source  # 16 x 128,256
    # the profile prices a layout with the real cost model
    job = JobSpec(teacher="llama-3.2-1b", student="llama-3.2-1b", cluster=str(out), gpus=2, seq_len=128,
                  global_batch=8, precision="fp32")
    spec = preset("llama-3.2-1b")
    p = evaluate(Problem(job=job, teacher=spec, student=spec, cluster=cl),
                 Candidate(student=Layout(dp=2, num_gpus=2), teacher=Layout(dp=2, num_gpus=2)), with_baselines=False)
    assert p.step_time_s > 0 and p.memory_per_gpu_gib > 0
    # and the planner plans on it
    from kdplan import planner
    from kdplan.jobs import resolve
    plan = planner.make_plan(resolve(job))
    assert plan.job.device_kind == "cpu" and plan.prediction.step_time_s > 0 and plan.world_size <= 2


def test_fit_profile_against_a_datasheet_base_fits_efficiencies():
    from kdplan.calibrate.profile import base_files
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    raw = _synthetic_raw(eff, 80e9, 150e-6, 2.0e9)
    base, base_gpu = base_files("dgx-a100-80g")
    cluster, gpu = fit_profile(raw, name="a100-test", gpu_name=base_gpu.name, gpus_per_node=8, host_memory_gib=2048,
                               command="kdplan profile --test", base=base, base_gpu=base_gpu)
    assert gpu.peak == base_gpu.peak  # datasheet peaks are kept ...
    assert gpu.efficiency.max_fraction == pytest.approx(80e9 / (base_gpu.peak.fp32_tflops * 1e12), rel=0.05)
    link, ref = cluster.groups[0].node.intra_node, base.groups[0].node.intra_node
    assert link.bandwidth_gb_per_s == ref.bandwidth_gb_per_s  # ... and so is the link's bandwidth:
    assert link.efficiency == pytest.approx(2.0 / ref.bandwidth_gb_per_s, rel=1e-3)  # the fit is a fraction of it
    assert cluster.groups[0].node.inter_node == base.groups[0].node.inter_node  # not measured: kept
    # a measured base (cpu-local) only lends its structure: peaks come from the measurement
    mbase, mgpu = base_files("cpu-local")
    _, g2 = fit_profile(raw, name="cpu-local", gpu_name="cpu-core", gpus_per_node=4, host_memory_gib=24,
                        command="x", base=mbase, base_gpu=mgpu)
    assert g2.peak.fp32_tflops * 1e12 <= 80e9 and g2.peak != mgpu.peak


def test_profile_fits_a_per_collective_bandwidth_factor():
    """gloo's reduce-scatter is not a ring (measured here: slower than the all-reduce of the same
    buffer): the profile gives it its own bandwidth factor and the cost model prices it with it."""
    from kdplan.cost import comm
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    alpha, bw = 150e-6, 2.0e9
    raw = _synthetic_raw(eff, 80e9, alpha, bw)
    for size in (2**12, 2**18, 2**22, 2**24):
        hops, vol = ring_terms("reduce_scatter", 2, size)
        raw["collectives"].append({"op": "reduce_scatter", "tier": "intra_node", "nranks": 2, "bytes": size,
                                   "time_s": hops * alpha + vol / (bw / 4)})
    cluster, _ = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8, command="x")
    node = cluster.groups[0].node
    f = node.intra_node.op_bandwidth_factor
    assert set(f) >= {"reduce_scatter"} and f["reduce_scatter"] < 0.5
    assert "reduce_scatter" in node.intra_node.source
    # the fitted reduce-scatter reproduces its large measurement within 15%; the all-reduce too
    rs, ar = comm.reduce_scatter_time(node, 2**24, 2), comm.allreduce_time(node, 2**24, 2)
    assert rs == pytest.approx(alpha + 2**23 / (bw / 4), rel=0.15)
    assert ar == pytest.approx(2 * alpha + 2**24 / bw, rel=0.15)
    assert rs > ar  # as measured with gloo


def test_fit_profile_measures_the_elementwise_share_of_the_memory_bandwidth():
    """Schema 1.11: each elementwise sample (two RMSNorms and residual adds over [m, k], SiLU and a
    product over [m, n]: m (10k + 5n) elements read plus written) gives the share of the measured
    copy bandwidth it reached; the profile keeps the median, drops an older base's
    elementwise_overhead_fraction (setting both is refused) and round-trips through its YAML."""
    from kdplan.cost.compute import elementwise_s
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    raw = _synthetic_raw(eff, 80e9, 150e-6, 2.0e9)
    bw = 2**27 / 0.01  # bytes/s, the synthetic copy
    shares = (0.6, 0.7, 0.9)
    raw["elementwise"] = [{"label": f"toy tp1 mlp_up fwd {m}", "m": m, "k": 512, "n": 2048, "dtype": "fp32",
                           "time_s": m * (10 * 512 + 5 * 2048) * 4 / (share * bw)}
                          for m, share in zip((32, 128, 512), shares)]
    old_base = ComputeEfficiency(elementwise_overhead_fraction=0.3)
    from kdplan.calibrate import profile as P
    e = P._fit_efficiency(raw, {"fp32": 80e-3, "bf16": 80e-3, "fp16": 80e-3}, old_base, bw / 1e9)
    assert e.elementwise_bandwidth_fraction == pytest.approx(0.7, rel=1e-3)
    assert e.elementwise_overhead_fraction is None and "share of the memory bandwidth" in e.source
    cluster, gpu = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8, command="x")
    assert gpu.efficiency.elementwise_bandwidth_fraction == pytest.approx(0.7, rel=1e-3)
    ComputeEfficiency.model_validate(gpu.efficiency.model_dump())
    # the block then pays its counted bytes at that share of the profile's bandwidth
    m = preset("llama-3.2-1b")
    from kdplan.cost.compute import fused_elementwise_elements
    assert elementwise_s(m, gpu, "fp32", tokens=1000, tp=2, block_gemm_s=1.0) == pytest.approx(
        fused_elementwise_elements(m) * 1000 / 2 * 4 / (gpu.memory_bandwidth_gb_per_s * 1e9 * 0.7), rel=1e-3)
