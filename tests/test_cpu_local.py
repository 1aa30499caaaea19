"""kdplan's own executor on a CPU (issue 13 item 5): the loss over the vocabulary and the teacher's
sampled encoding priced from what `kdplan profile` measured of the executor's own kernels
(GPUSpec.loss_passes, sample_passes), the optimizer's measured bandwidth, a report that moved
with its plan, and the plumbing of benchmarks/cpu_local_refresh.py. No torch here."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from kdplan.calibrate.calibrate import load_case
from kdplan.calibrate.profile import fit_framework, fit_optimizer, fit_profile, make_spec
from kdplan.cost import price_student, price_teacher
from kdplan.cost.compute import CE_PASSES, KD_PASSES, SAMPLE_PASSES, loss_passes, loss_time
from kdplan.errors import InputError
from kdplan.io import sha256_file
from kdplan.jobs import load_job, resolve
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import LOSS_KINDS, ClusterFile, ComputeEfficiency, GPUSpec, Overheads
from kdplan.schema.compression import parse_compression
from kdplan.schema.plan import Layout

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-cpu" / "job.toml"
MEASURED = Path(__file__).parent / "data" / "calibration-loop-2026-11-28"


def _with_gpu(problem, **update):
    """The problem with its (only) device spec updated."""
    cl = problem.cluster
    name = cl.groups[0].node.gpu
    gpu = cl.gpus[name].model_copy(update=update)
    return dataclasses.replace(problem, cluster=cl.model_copy(update={"gpus": {**cl.gpus, name: gpu}})), gpu


@pytest.fixture(scope="module")
def tiny():
    return resolve(load_job(str(TINY)), job_path=str(TINY))


def test_loss_passes_come_from_the_device_profile_nearest_vocabulary(tiny):
    """Measured passes (per teacher-target kind, at the nearest profiled vocabulary in log V)
    replace the counted ones; a kind the profile did not measure keeps its count."""
    _, gpu = _with_gpu(tiny, loss_passes={}, sample_passes={})
    assert loss_passes(train=True, kd="sample", gpu=gpu, vocab=8192) == CE_PASSES + KD_PASSES["sample"]
    assert loss_passes(train=False, kd="sample", gpu=gpu, vocab=8192) == SAMPLE_PASSES
    _, gpu = _with_gpu(tiny, loss_passes={8192: {"sample": 120.0, "dense": 240.0, "none": 200.0},
                                          131072: {"sample": 60.0}},
                       sample_passes={8192: 30.0, 131072: 20.0})
    assert loss_passes(train=True, kd="sample", gpu=gpu, vocab=8192) == 120.0
    assert loss_passes(train=True, kd="dense", gpu=gpu, vocab=10000) == 240.0
    assert loss_passes(train=True, kd=None, gpu=gpu, vocab=8192) == 200.0  # plain training: "none"
    assert loss_passes(train=True, kd="sample", gpu=gpu, vocab=128256) == 60.0
    assert loss_passes(train=True, kd="topk", gpu=gpu, vocab=8192) == CE_PASSES + KD_PASSES["topk"]  # not measured
    assert loss_passes(train=False, kd="sample", gpu=gpu, vocab=8000) == 30.0
    assert loss_passes(train=False, kd="sample", gpu=gpu, vocab=150000) == 20.0
    # a hybrid topk:M+sample:N adds the exact head's top-k to the sampled encoding
    assert loss_passes(train=False, kd="sample", gpu=gpu, k=8, vocab=8192) == 30.0 + loss_passes(
        train=False, kd="topk", gpu=gpu, k=8, vocab=8192)


def test_role_prices_scale_with_the_measured_passes(tiny):
    """The student's loss term and the teacher's sampled encoding are priced at the measured
    passes: the old code priced both from counted passes whatever the profile measured."""
    comp = parse_compression("sample:64")
    lay = Layout(dp=2, micro_batch=4, num_gpus=2)
    counted, _ = _with_gpu(tiny, loss_passes={}, sample_passes={})
    measured, _ = _with_gpu(tiny, loss_passes={8192: {"sample": 3.0 * (CE_PASSES + KD_PASSES["sample"])}},
                            sample_passes={8192: 2.0 * SAMPLE_PASSES})
    s0, s1 = (price_student(p, lay, compression=comp) for p in (counted, measured))
    assert s0.loss_s > 0 and s1.loss_s == pytest.approx(3.0 * s0.loss_s)
    assert s1.time_s - s0.time_s == pytest.approx(s1.loss_s - s0.loss_s)
    t0, t1 = (price_teacher(p, lay, compression=comp) for p in (counted, measured))
    assert t0.loss_s > 0 and t1.loss_s == pytest.approx(2.0 * t0.loss_s)


def test_loss_tables_validate():
    gpu = load_cluster("cpu-local").gpu_of_group(0)
    with pytest.raises(ValueError, match="loss_passes"):
        GPUSpec.model_validate(dict(gpu.model_dump(), loss_passes={8192: {"kl": 3.0}}))
    with pytest.raises(ValueError, match="loss_passes"):
        GPUSpec.model_validate(dict(gpu.model_dump(), loss_passes={8192: {"dense": 0.0}}))
    with pytest.raises(ValueError, match="sample_passes"):
        GPUSpec.model_validate(dict(gpu.model_dump(), sample_passes={0: 3.0}))


def test_shipped_cpu_core_prices_the_tiny_loss_from_measurements(tiny):
    """cpu-local's device has the executor's loss measured for every kind at the tiny example's
    vocabulary, and the sampled encoding the tiny plan uses."""
    gpu = load_cluster("cpu-local").gpu_of_group(0)
    assert set(gpu.loss_passes[8192]) == set(LOSS_KINDS) and 8192 in gpu.sample_passes
    assert "loss passes" in gpu.source


def _raw_with_loss(eff: ComputeEfficiency) -> dict:
    from tests.test_profile import _synthetic_raw
    return _synthetic_raw(eff, 80e9, 150e-6, 2.0e9)


def test_profile_fits_loss_tables_in_loss_pass_units():
    """The measured loss per kind and the sampled encoding, over one loss pass of the fitted
    profile on the same tensor: pricing them reproduces the measured times."""
    eff = ComputeEfficiency(max_fraction=1.0, half_saturation_gflop=0.02, min_dim_saturation=1)
    raw = _raw_with_loss(eff)
    _, plain = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8, command="x")
    assert plain.loss_passes == {} and plain.sample_passes == {}
    E = 256 * 8192
    raw["loss_kinds"] = [{"tokens": 256, "vocab": 8192, "kind": k, "elements": E, "time_s": t}
                         for k, t in (("dense", 0.12), ("sample", 0.06))]
    raw["sample_encode"] = [{"tokens": 256, "vocab": 8192, "samples": 64, "elements": E, "time_s": 0.015}]
    cluster, gpu = fit_profile(raw, name="toy", gpu_name="toy-core", gpus_per_node=2, host_memory_gib=8, command="x")
    frac = cluster.overheads.loss_bytes_per_s_fraction
    for kind, t in (("dense", 0.12), ("sample", 0.06)):
        assert loss_time(gpu, E, gpu.loss_passes[8192][kind], frac) == pytest.approx(t, rel=1e-3)
    assert loss_time(gpu, E, gpu.sample_passes[8192], frac) == pytest.approx(0.015, rel=1e-3)
    assert "V=8192: dense" in gpu.source
    ClusterFile.model_validate(cluster.model_dump())


def test_make_spec_measures_each_kind_at_each_vocabulary():
    spec = make_spec(["gpt-1.3b", "llama-3.2-1b"], "quick", ["fp32"], "cpu")
    lk = spec["loss_kinds"]
    assert lk["vocabs"] == [50257, 128256] and lk["samples"] == 64
    assert [k.split(":")[0] for k in lk["kinds"]] == list(LOSS_KINDS)
    assert spec["overheads"]["optimizer_large_elements"] > spec["overheads"]["optimizer_elements"]


def test_optimizer_bandwidth_is_measured():
    """AdamW over small tensors gives the per-tensor cost; over large ones, less those fixed
    costs, the update's share of the memory bandwidth (30 B per parameter)."""
    bw, frac, per, fixed = 40.0, 0.25, 30e-6, 1e-4
    opt = [{"tensors": n, "elements": e, "time_s": fixed + per * n + (30.0 * n * e / (bw * 1e9 * frac) if e > 1024 else 0)}
           for n, e in ((8, 1024), (64, 1024), (8, 2**20))]
    p, f, notes = fit_optimizer(opt, bw)
    assert p == pytest.approx(per, rel=1e-3) and f == pytest.approx(frac, rel=1e-3) and len(notes) == 2
    assert fit_optimizer(opt[:2], bw)[1] is None  # no large step: not measured
    raw = {"overheads": [{"variant": "train", "layers": L, "tokens": n, "ranks": 2, "time_s": 1e-3 + L * 1e-3 + n * 1e-5}
                         for L in (1, 3) for n in (16, 32)], "optimizer": opt}
    assert fit_framework(raw, Overheads(), bw).optimizer_bytes_per_s_fraction == pytest.approx(frac, rel=1e-3)
    assert fit_framework(raw, Overheads()).optimizer_bytes_per_s_fraction == Overheads().optimizer_bytes_per_s_fraction


def test_a_report_moved_with_its_plan_still_loads(tmp_path):
    """A report whose recorded plan path is gone (the run's folder) finds a plan beside it, of the
    same name or not, only if its bytes hash to the recorded sha256."""
    src = MEASURED / "dp2"
    rep = json.loads((src / "measured-report.json").read_text())
    rep["plan"]["path"] = str(tmp_path / "gone" / "measured-plan.json")  # absolute, no longer there
    d = tmp_path / "kept"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    with pytest.raises(InputError, match="not found"):
        load_case(str(d / "report.json"))
    shutil.copyfile(src / "measured-plan.json", d / "measured-plan.json")
    case = load_case(str(d / "report.json"))
    assert case.plan.student.layout.dp == 2
    (d / "measured-plan.json").rename(d / "run-plan.json")  # another name, the same bytes
    assert load_case(str(d / "report.json")).plan.student.layout.dp == 2
    (d / "run-plan.json").write_text((src / "measured-plan.json").read_text().replace('"dp": 2', '"dp":  2'))
    with pytest.raises(InputError, match="not found"):  # other bytes: not the plan that ran
        load_case(str(d / "report.json"))


def _refresh():
    sys.path.insert(0, str(ROOT))
    import benchmarks.cpu_local_refresh as refresh
    return refresh


def test_refresh_base_resets_what_no_profile_measures(tmp_path):
    refresh = _refresh()
    doc = yaml.safe_load(refresh.unmeasured_base(tmp_path).read_text())
    shipped = yaml.safe_load(refresh.CLUSTER_OUT.read_text())
    for k in refresh.UNMEASURED:
        assert doc["overheads"][k] == getattr(Overheads(), k)
    assert doc["groups"] == shipped["groups"]  # structure and links kept
    assert "optimizer_bytes_per_s_fraction" not in refresh.UNMEASURED  # measured now


@pytest.mark.slow  # runs `kdplan calibrate` on two measured reports (~10-30 s)
def test_refresh_writes_a_calibrated_profile_whose_provenance_points_at_the_reports(tmp_path):
    """(d) of benchmarks/cpu_local_refresh.py on reports of a real calibration loop: the reports
    and their plans are copied, calibrated on from there, and the result is written as a cluster
    file without inline devices plus the device's hardware file, the provenance listing each
    report with its sha256."""
    refresh = _refresh()
    kept = [refresh.keep(MEASURED / n / "measured-report.json", tmp_path / "results" / n) for n in ("dp2", "tp2")]
    assert all((p.parent / "run-plan.json").is_file() and p.name == "run-report.json" for p in kept)
    assert not any(p.name in ("plan.json", "report.json") for k in kept for p in k.parent.iterdir())  # git-ignored names
    cl_out, hw_out = tmp_path / "cpu-local.yaml", tmp_path / "hw.yaml"
    refresh.write_shipped(MEASURED / "profile.yaml", kept, tmp_path, cluster_out=cl_out, hardware_out=hw_out)
    cf = ClusterFile.model_validate(yaml.safe_load(cl_out.read_text()))
    hw = yaml.safe_load(hw_out.read_text())
    assert cf.gpus == {} and hw["gpu"]["name"] == cf.groups[0].node.gpu
    assert cf.provenance.kind == "calibration" and len(cf.provenance.reports) == 2
    for entry, path in zip(cf.provenance.reports, kept):
        name, sha = entry.split(" sha256:")
        assert Path(name).resolve() == path.resolve() and sha == sha256_file(path)


def test_shipped_cpu_local_is_calibrated_on_committed_reports():
    """Issue 13 item 5: the shipped cpu-local is the calibrated profile, its provenance naming
    the reports it was fitted on, which are in the repository with the recorded hashes."""
    from kdplan.io import load_model
    cf = load_model(ClusterFile, str(ROOT / "profiles" / "clusters" / "cpu-local.yaml"))
    assert cf.provenance.kind == "calibration" and cf.provenance.reports
    for entry in cf.provenance.reports:
        name, sha = entry.split(" sha256:")
        assert (ROOT / name).is_file() and sha256_file(ROOT / name) == sha


def _block_samples(spec, gpu, *, passes: float, q: int = 4) -> list[dict]:
    """executor.bench's block_elementwise samples of a block whose op-by-op work beyond its
    matmuls is ``passes`` passes of ``q`` B over h + f per token (plus the fused elementwise work
    cost.compute.elementwise_s prices and fixed per-block costs, which the fit must see through)."""
    from kdplan.cost.compute import elementwise_s
    from kdplan.cost.memory import active_ffn_width
    width = spec.hidden_size + active_ffn_width(spec)
    bw_gb_per_s = gpu.memory_bandwidth_gb_per_s
    out = []
    for tokens in (128, 512):
        lin, attn = 2e-4 + 3e-6 * tokens, 5e-5 + 4e-7 * tokens
        fused = elementwise_s(spec, gpu, "fp32", tokens=tokens, tp=1, block_gemm_s=lin - 2e-4)
        block = 3e-4 + lin + attn + fused + passes * tokens * width * q / (bw_gb_per_s * 1e9)
        out.append({"batch": tokens // 128, "seq": 128, "tokens": tokens, "model": spec.model_dump(mode="json"),
                    "bytes": q, "block_s": block, "stage_1_block_s": 2 * block, "linear_s": lin, "attention_s": attn,
                    "clock": "process_time"})
    return out


def test_profile_fits_the_executors_eager_block_work_in_passes(tiny):
    """kdplan profile measures the executor's own block (Hugging Face modeling code, op by op) at
    two token counts: what grows beyond its matmuls, attention core and the fused elementwise
    share is Overheads.eager_elementwise_passes (block_ops eager), recovered from synthetic
    samples of a known count, with the measurement in the provenance."""
    from kdplan.calibrate.profile import fit_block_ops
    gpu = tiny.cluster.gpu_of_group(0)
    ov = fit_block_ops(_block_samples(tiny.student, gpu, passes=12.5), Overheads(), gpu)
    assert ov.block_ops == "eager" and ov.eager_elementwise_passes == pytest.approx(12.5, rel=1e-3)
    assert "eager_elementwise_passes: kdplan profile: the executor's block" in ov.framework.source
    # a block that is all matmuls and fused work: no eager passes (never negative)
    ov0 = fit_block_ops(_block_samples(tiny.student, gpu, passes=0.0), Overheads(), gpu)
    assert ov0.eager_elementwise_passes == pytest.approx(0.0, abs=1e-3)
    Overheads.model_validate(ov.model_dump())


def _with_overheads(problem, **update):
    cl = problem.cluster
    return dataclasses.replace(problem, cluster=cl.model_copy(update={"overheads": cl.overheads.model_copy(update=update)}))


def test_eager_passes_price_each_block_as_physics_says(tiny):
    """The measured eager passes lengthen every block's forward by passes x b*s*(h + f) x q / the
    memory bandwidth, and its backward twice that (student: 3x per block per micro-batch; the
    forward-only teacher: 1x): the prediction grows by exactly that, and more passes cost more."""
    from kdplan.cost.compute import PRECISION_BYTES
    from kdplan.cost.memory import active_ffn_width
    comp = parse_compression("sample:64")
    slay, tlay = Layout(dp=2, micro_batch=2, num_gpus=2), Layout(dp=2, micro_batch=1, num_gpus=2)
    base = _with_overheads(tiny, block_ops="eager", eager_elementwise_passes=0.0)
    more = _with_overheads(tiny, block_ops="eager", eager_elementwise_passes=10.0)
    gpu = tiny.cluster.gpu_of_group(0)
    q, s, B = PRECISION_BYTES[tiny.job.precision], tiny.job.seq_len, tiny.job.global_batch
    for model, lay, train, price in ((tiny.student, slay, True, price_student), (tiny.teacher, tlay, False, price_teacher)):
        p0, p1 = (price(p, lay, compression=comp) for p in (base, more))
        m = B // (lay.dp * lay.micro_batch)
        one = 10.0 * lay.micro_batch * s * (model.hidden_size + active_ffn_width(model)) * q / (gpu.memory_bandwidth_gb_per_s * 1e9)
        expected = (3 if train else 1) * m * model.num_layers * one
        assert p1.compute_s - p0.compute_s == pytest.approx(expected, rel=1e-6)
        assert p1.time_s > p0.time_s
    # fused blocks (another runtime) never pay them
    fused = _with_overheads(tiny, block_ops="fused", eager_elementwise_passes=10.0)
    assert price_student(fused, slay, compression=comp).compute_s == pytest.approx(
        price_student(base, slay, compression=comp).compute_s)
