"""Framework overheads (issue 13 item 5): the profile fields validate, the priced term is the
formula by hand, the profile's fit recovers known fixed costs from a fake timer, and the bench's
measurement runs (its GPU branch checked on the CPU with a stand-in timer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdplan.calibrate.fit import fit_fixed_costs, fit_per_item
from kdplan.calibrate.profile import FSDP_UNIT_COLLECTIVES, TP_BLOCK_COLLECTIVES, fit_ddp_sync, fit_framework, make_spec
from kdplan.cost import price_student, price_teacher
from kdplan.cost.overhead import FORWARD_SHARE, FP32_GRAD_BYTES, ddp_sync_s, framework_overhead_s, parameter_tensors
from kdplan.models import load_model_spec
from kdplan.problem import Problem
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import FrameworkOverheads, Overheads
from kdplan.schema.compression import parse_compression
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout

from conftest import run_kdplan

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu"


# ---- schema ----------------------------------------------------------------------------------

def test_framework_fields_validate():
    fw = FrameworkOverheads(micro_batch_s=0.01, tp_block_s=1e-4, source="test")
    assert Overheads(framework=fw).framework.micro_batch_s == 0.01
    assert Overheads().framework == FrameworkOverheads()  # unmeasured: zeros, priced as nothing
    for bad in ({"micro_batch_s": -1e-3}, {"fsdp_unit_s": float("nan")}, {"optimizer_tensor_s": 11.0},
                {"dtensor_s": 0.1}):
        with pytest.raises(ValidationError):
            FrameworkOverheads(**bad)


def test_bad_framework_value_in_a_cluster_yaml_exits_2_in_one_line(tmp_path):
    src = Path(__file__).resolve().parents[1] / "profiles" / "clusters" / "cpu-local.yaml"
    doc = yaml.safe_load(src.read_text())
    doc.setdefault("overheads", {}).setdefault("framework", {})["micro_batch_s"] = -0.5
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = run_kdplan("plan", str(TINY / "job.toml"), "--cluster", p, "-o", tmp_path / "plan.json")
    assert r.returncode == 2, r.stderr[-500:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "micro_batch_s" in err[0] and "Traceback" not in r.stderr


# ---- the priced term ---------------------------------------------------------------------------

def _problem(fw: FrameworkOverheads, layer_overhead_s: float = 0.0) -> Problem:
    cl = load_cluster("cpu-local")
    ov = cl.overheads.model_copy(update={"framework": fw, "layer_overhead_s": layer_overhead_s})
    cl = cl.model_copy(update={"overheads": ov})
    job = JobSpec(teacher=str(TINY / "teacher" / "config.json"), student=str(TINY / "student" / "config.json"),
                  cluster="cpu-local", gpus=2, seq_len=128, global_batch=16, precision="fp32")
    return Problem(job=job, teacher=load_model_spec(job.teacher), student=load_model_spec(job.student), cluster=cl)


def test_priced_term_equals_the_formula_by_hand():
    dense = parse_compression("dense")
    A, B, O, F = 0.011, 0.0007, 3e-5, 0.004
    zero = _problem(FrameworkOverheads())
    fw = _problem(FrameworkOverheads(micro_batch_s=A, tp_block_s=B, optimizer_tensor_s=O, forward_micro_batch_s=F))
    # student dp=2 mb=2: m = 16 / 4 = 4 micro-batches; 2 blocks; 2*(4 + 3 + 2) + embedding + final norm + head tensors
    lay = Layout(dp=2, micro_batch=2, num_gpus=2)
    s0, s1 = (price_student(p, lay, compression=dense) for p in (zero, fw))
    assert parameter_tensors(zero.student, 2, first=True, last=True) == 21
    assert s1.time_s - s0.time_s == pytest.approx(4 * A + 21 * O, rel=1e-9)
    assert s1.optimizer_s - s0.optimizer_s == pytest.approx(21 * O, rel=1e-9)
    # tp=2: each of the 2 blocks adds B per micro-batch (m = 16 / 2 = 8 micro-batches of 2 sequences)
    lay = Layout(tp=2, micro_batch=2, num_gpus=2)
    s0, s1 = (price_student(p, lay, compression=dense) for p in (zero, fw))
    assert s1.time_s - s0.time_s == pytest.approx(8 * (A + 2 * B) + 21 * O, rel=1e-9)
    # the forward-only teacher: its micro-batch cost and the forward third of the DTensor cost per block
    t0, t1 = (price_teacher(p, Layout(tp=2, micro_batch=1, num_gpus=2), compression=dense) for p in (zero, fw))
    assert t1.time_s - t0.time_s == pytest.approx(16 * (F + FORWARD_SHARE * 4 * B), rel=1e-9)
    # the per-block launch cost (layer_overhead_s) joins them; the prediction shows them as "framework"
    L = 0.002
    blk = _problem(FrameworkOverheads(micro_batch_s=A), layer_overhead_s=L)
    lay = Layout(dp=2, micro_batch=2, num_gpus=2)
    s0, s1 = (price_student(p, lay, compression=dense) for p in (zero, blk))
    assert s1.time_s - s0.time_s == pytest.approx(4 * (A + 2 * L), rel=1e-9)
    assert s1.framework_s == pytest.approx(4 * (A + 2 * L), rel=1e-9) and s0.framework_s == 0.0


def test_framework_overhead_split_and_fsdp_units_by_hand():
    fw = FrameworkOverheads(micro_batch_s=0.03, fsdp_unit_s=0.002, tp_block_s=0.001, forward_micro_batch_s=0.005)
    ov = Overheads(framework=fw, layer_overhead_s=0.0004)
    f, b = framework_overhead_s(ov, train=True, n_layers=3, tp=1, fsdp=True)
    total = 0.03 + 3 * 0.0004 + (3 + 1) * 0.002  # 3 blocks' launches, 3 block units + the root unit
    assert (f, b) == pytest.approx((total / 3, 2 * total / 3))
    f, b = framework_overhead_s(ov, train=False, n_layers=3, tp=2, fsdp=False)
    assert (f, b) == pytest.approx((0.005 + 3 * (0.0004 + 0.001) / 3, 0.0))
    assert framework_overhead_s(Overheads(), train=True, n_layers=8, tp=4, fsdp=True) == (0.0, 0.0)


def test_ddp_sync_priced_once_per_step_on_ddp_roles_only():
    """FrameworkOverheads.ddp_sync_byte_s: once per optimizer step, per fp32 gradient byte of the
    stage, on a data-parallel role without ZeRO; not on ZeRO-1 or 3 (no DDP reducer), nor on
    one replica, nor on the forward-only teacher."""
    dense = parse_compression("dense")
    R = 7e-10
    zero, ddp = _problem(FrameworkOverheads()), _problem(FrameworkOverheads(ddp_sync_byte_s=R))
    lay = Layout(dp=2, micro_batch=2, num_gpus=2)  # 4 micro-batches: still one synchronisation
    s0, s1 = (price_student(p, lay, compression=dense) for p in (zero, ddp))
    params = zero.student.num_params()  # the cost model counts the stage within 0.01% of this (its final norm)
    assert ddp_sync_s(ddp.cluster.overheads.framework, params * FP32_GRAD_BYTES) == pytest.approx(R * 4 * params)
    assert s1.time_s - s0.time_s == pytest.approx(R * 4 * params, rel=1e-4)
    assert s1.stages[0].grad_reduce_s - s0.stages[0].grad_reduce_s == pytest.approx(R * 4 * params, rel=1e-4)
    assert s1.comm_exposed_s["gradients"] - s0.comm_exposed_s["gradients"] == pytest.approx(R * 4 * params, rel=1e-4)
    for other in (Layout(dp=2, zero=1, micro_batch=2, num_gpus=2), Layout(dp=2, zero=3, micro_batch=2, num_gpus=2),
                  Layout(tp=2, micro_batch=2, num_gpus=2)):
        a, b = (price_student(p, other, compression=dense) for p in (zero, ddp))
        assert a.time_s == b.time_s, other
    t0, t1 = (price_teacher(p, Layout(dp=2, micro_batch=2, num_gpus=2), compression=dense) for p in (zero, ddp))
    assert t0.time_s == t1.time_s


def test_ddp_sync_fit_is_the_excess_over_the_all_reduce_per_byte():
    base = Overheads(framework=FrameworkOverheads(source="earlier fits"))
    samples = [{"layers": 1, "grad_bytes": 8e6, "sync_s": 0.020, "no_sync_s": 0.010, "allreduce_s": 0.004},
               {"layers": 3, "grad_bytes": 1.2e7, "sync_s": 0.030, "no_sync_s": 0.014, "allreduce_s": 0.006}]
    fw = fit_ddp_sync(samples, base).framework
    assert fw.ddp_sync_byte_s == pytest.approx((0.006 + 0.010) / 2e7, rel=1e-3)
    assert fw.source.startswith("earlier fits; ddp_sync_byte_s:") and "0.8 ns per gradient byte" in fw.source
    # a synchronisation no dearer than its all-reduce prices nothing (never negative); none measured: unchanged
    cheap = [dict(samples[0], sync_s=0.012)]
    assert fit_ddp_sync(cheap, base).framework.ddp_sync_byte_s == 0.0
    assert fit_ddp_sync([], base) is base


# ---- the fit ---------------------------------------------------------------------------------

def _fake_timer(a: float, b: float, c: float, d: float):
    """A 'measurement' of L blocks at n tokens by a machine with known fixed and per-token costs."""
    return lambda L, n: a + b * n + L * (c + d * n)


def test_fixed_cost_fit_recovers_synthetic_overheads():
    t = _fake_timer(0.012, 4e-5, 0.0015, 9e-6)
    xs = [{"layers": L, "tokens": n, "time_s": t(L, n)} for L in (1, 3) for n in (16, 32, 64)]
    f = fit_fixed_costs(xs)
    assert f.micro_batch_s == pytest.approx(0.012, rel=1e-6) and f.block_s == pytest.approx(0.0015, rel=1e-6)
    assert f.per_token_s == pytest.approx(4e-5, rel=1e-6) and f.rms_error < 1e-9
    a, k = fit_per_item([8, 64], [1e-4 + 8 * 2e-5, 1e-4 + 64 * 2e-5])
    assert (a, k) == pytest.approx((1e-4, 2e-5), rel=1e-6)
    with pytest.raises(ValueError):
        fit_fixed_costs([x for x in xs if x["layers"] == 1])


def test_profile_fit_recovers_framework_terms_from_a_fake_timer():
    """The bench's raw records from a fake machine: plain training (micro-batch 12 ms, block 1.5 ms),
    forward (2 ms, 0.4 ms), TP and FSDP blocks dearer by a known DTensor / hook cost plus their
    collectives' latency, which the fit takes out (the links price it)."""
    lat = {"all_reduce": 2e-4, "all_gather": 1.5e-4, "reduce_scatter": 1e-4}
    tp_extra, fsdp_extra = 8e-4, 6e-4
    tp_coll = sum(n * lat[op] for op, n in TP_BLOCK_COLLECTIVES.items())
    fs_coll = sum(n * lat[op] for op, n in FSDP_UNIT_COLLECTIVES.items())
    timers = {"train": _fake_timer(0.012, 4e-5, 0.0015, 9e-6), "forward": _fake_timer(0.002, 1e-5, 4e-4, 3e-6),
              "tp": _fake_timer(0.013, 3e-5, 0.0015 + tp_extra + tp_coll, 6e-6),
              "fsdp": _fake_timer(0.014, 4e-5, 0.0015 + fsdp_extra + fs_coll, 9e-6)}
    raw = {"overheads": [{"variant": v, "layers": L, "tokens": n, "ranks": 2, "time_s": t(L, n)}
                         for v, t in timers.items() for L in (1, 3) for n in (16, 32, 64)],
           "optimizer": [{"tensors": n, "elements": 1024, "time_s": 5e-5 + n * 2.5e-5} for n in (8, 64)],
           "collectives": [{"op": op, "tier": "intra_node", "nranks": 2, "bytes": size, "time_s": x * (1 + size / 2**20)}
                           for op, x in lat.items() for size in (4096, 2**20)]}
    ov = fit_framework(raw, Overheads())
    fw = ov.framework
    assert ov.layer_overhead_s == pytest.approx(0.0015, rel=1e-3)
    assert fw.micro_batch_s == pytest.approx(0.012, rel=1e-3)
    assert fw.forward_micro_batch_s == pytest.approx(0.002, rel=1e-3)
    assert fw.tp_block_s == pytest.approx(tp_extra, rel=1e-2)
    assert fw.fsdp_unit_s == pytest.approx(fsdp_extra, rel=1e-2)
    assert fw.optimizer_tensor_s == pytest.approx(2.5e-5, rel=1e-3)
    assert "intercepts" in fw.source and "2 ranks" in fw.source
    # a CPU's process time holds no wait on the other rank: nothing is taken out
    cpu = dict(raw, overheads=[dict(x, clock="process_time") for x in raw["overheads"]])
    assert fit_framework(cpu, Overheads()).framework.tp_block_s == pytest.approx(tp_extra + tp_coll, rel=1e-2)
    # without the multi-rank variants (one process) those terms stay 0
    raw["overheads"] = [x for x in raw["overheads"] if x["variant"] in ("train", "forward")]
    assert fit_framework(raw, Overheads()).framework.tp_block_s == 0.0


def test_make_spec_asks_for_the_smallest_models_overheads():
    spec = make_spec(["llama-3.2-1b", str(TINY / "teacher" / "config.json")], "quick", ["fp32"], "cpu")
    ov = spec["overheads"]
    assert ov["model"]["hidden_size"] == 256 and ov["layers"] == [1, 3] and len(ov["tokens"]) == 3
    assert ov["optimizer_tensors"] == [8, 64]


# ---- the bench (torch) ---------------------------------------------------------------------------

def _bench_worker(rank, world, port, q):
    import torch.distributed as dist

    from conftest import init_gloo
    from executor.bench import run as bench
    init_gloo(rank, world, port)
    spec = make_spec([str(TINY / "student" / "config.json")], "tiny", ["fp32"], "cpu")
    ov = dict(spec["overheads"], tokens=[4, 8], layers=[1, 2])
    b = bench.Bench(spec)
    out = [b.overhead(ov, v, L, n) for v in bench.overhead_variants(ov, world) for L in ov["layers"] for n in ov["tokens"]]
    out.append(b.optimizer(8, 64))
    out.append(b.ddp_sync(ov, 1, tokens=4))
    # the GPU branch: timed by Bench.time_fn (CUDA events around back-to-back repetitions), not the CPU's min
    calls = []
    b.cuda = True
    b.time_fn = lambda fn, **kw: calls.append(fn) or 1.0
    gpu = b.overhead(ov, "forward", 1, 4)
    q.put((rank, (out, gpu["time_s"], len(calls))))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.executor
def test_bench_measures_every_variant_on_two_ranks():
    pytest.importorskip("torch")
    from conftest import spawn_gloo
    res = spawn_gloo(_bench_worker, 2)
    out, gpu_t, n_calls = res[0]
    assert {x["variant"] for x in out if "variant" in x} == {"train", "forward", "tp", "fsdp"}
    assert all(x["time_s"] > 0 for x in out if "time_s" in x) and gpu_t == 1.0 and n_calls == 1
    raw = {"overheads": [x for x in out if "variant" in x], "optimizer": [], "collectives": []}
    fw = fit_framework(raw, Overheads())
    assert fw.layer_overhead_s >= 0 and fw.framework.micro_batch_s >= 0
    # DDP's synchronisation, as the executor wraps a data-parallel role (timed, not compared: no
    # speed asserts in tests); the bytes are the stage's fp32 gradients, counted from its parameters
    sync, = [x for x in out if "sync_s" in x]
    assert sync["sync_s"] > 0 and sync["no_sync_s"] > 0 and sync["allreduce_s"] > 0 and sync["ranks"] == 2
    assert sync["grad_bytes"] % 4 == 0 and sync["grad_bytes"] > 4 * 8 * 128  # at least the embedding rows
    assert fit_ddp_sync([sync], Overheads()).framework.ddp_sync_byte_s >= 0


def test_overheads_are_measured_on_a_narrow_proxy_of_the_smallest_model():
    """A 1B model's 128K-token head and 2048-wide blocks cost a fixed ~0.1-1 s per micro-batch in
    weight-gradient writes on a CPU; measured on them, a fit over tokens booked that as framework
    time (1.8 s per micro-batch, 93 ms per block) for every model. The proxy keeps the
    architecture at hidden <= 256 and vocabulary <= 8,192."""
    from kdplan.calibrate.profile import make_spec, overhead_proxy
    from kdplan.models import preset
    big = preset("llama-3.2-1b")
    p = overhead_proxy(big)
    assert (p.hidden_size, p.vocab_size, p.num_heads % p.num_kv_heads) == (256, 8192, 0)
    assert (p.family, p.gated_mlp, p.norm, p.tied_embeddings) == (big.family, big.gated_mlp, big.norm, big.tied_embeddings)
    assert p.num_heads // p.num_kv_heads == min(big.num_heads // big.num_kv_heads, p.num_heads)
    small = preset("llama-3.2-1b").model_copy(update=dict(hidden_size=128, num_heads=2, num_kv_heads=1,
                                                          ffn_hidden_size=512, vocab_size=4096))
    assert overhead_proxy(small).model_dump(exclude={"name"}) == small.model_dump(exclude={"name"})
    spec = make_spec(["llama-3.2-1b"], "tiny", ["fp32"], "cpu")
    assert spec["overheads"]["model"]["hidden_size"] == 256 and spec["overheads"]["model"]["vocab_size"] == 8192
