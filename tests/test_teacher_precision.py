"""Teacher precision (--teacher-precision, --fix teacher.precision): what the job allows, what the
hardware supports, what the cost model charges, and what the solver picks."""

import pytest

from kdplan import cost
from kdplan.cost.compute import elementwise_s, layer_time
from kdplan.cost.role import block_weight_bytes
from kdplan.errors import InputError
from kdplan.jobs import JobSpec, load_job, resolve
from kdplan.planner import Planner
from kdplan.schema.compression import Compression
from kdplan.schema.plan import Layout
from kdplan.search.bruteforce import brute_force
from kdplan.search.choose import TIE_TOLERANCE, whole_space_optimum
from kdplan.search.candidates import arrangements
from kdplan.search.space import Space

from conftest import run_kdplan

SMALL = dict(teacher="gpt-6.7b", student="gpt-1.3b", gpus=4, seq_len=1024, global_batch=16,
             kd={"allowed_compressions": ["topk:64:8"]})


def _teacher_precisions(p) -> set[str]:
    sp = Space(p, cost)
    return {o.layout.forward_precision for a in arrangements(p) if a.mode != "train" for o in sp.teacher_options(a)}


def _student_precisions(p) -> set[str]:
    sp = Space(p, cost)
    return {o.layout.forward_precision for a in arrangements(p)
            for o in sp.options("student", a.student_gpus, a.student_groups)}


@pytest.mark.parametrize("cluster,setting,pins,expected", [
    ("dgx-h100", None, [], {"bf16"}),  # the default: the exact teacher only
    ("dgx-h100", "bf16", [], {"bf16"}),
    ("dgx-h100", "auto", [], {"bf16", "fp8", "int8"}),
    ("dgx-a100-80g", "auto", [], {"bf16", "int8"}),  # no fp8 tensor cores on A100: not offered
    ("cpu-local", "auto", [], {"bf16"}),
    ("dgx-h100", "fp8", [], {"fp8"}),
    ("dgx-a100-80g", "int8", [], {"int8"}),
    ("dgx-h100", None, ["teacher.precision=fp8"], {"fp8"}),  # a pin on the default decides
    ("dgx-h100", "auto", ["teacher.precision=int8"], {"int8"}),
])
def test_candidates_respect_the_job_and_the_hardware(cluster, setting, pins, expected):
    spec = JobSpec(**{**SMALL, "cluster": cluster, **({"teacher_precision": setting} if setting else {}),
                      **({"gpus": 2} if cluster == "cpu-local" else {})})
    p = resolve(spec, pins=pins)
    assert _teacher_precisions(p) == expected
    assert _student_precisions(p) == {"bf16"}  # the student always trains exactly


def test_a_quantized_teacher_is_never_sharded_by_zero3():
    """The executor refuses teacher zero = 3 with fp8 / int8 (FSDP shards no quantized buffers), so
    the planner never offers it; the exact teacher still may shard."""
    p = resolve(JobSpec(**{**SMALL, "cluster": "dgx-h100", "teacher_precision": "auto"}))
    sp = Space(p, cost)
    opts = [o.layout for a in arrangements(p) if a.mode != "train" for o in sp.teacher_options(a)]
    assert {lo.zero for lo in opts if lo.forward_precision != "bf16"} == {0}
    assert {lo.zero for lo in opts if lo.forward_precision == "bf16"} == {0, 3}


def test_mixed_cluster_quantizes_only_on_gpus_that_support_it():
    p = resolve(JobSpec(teacher="llama-3-8b", student="llama-3.2-1b", cluster="mixed-a100-h100", gpus=16,
                        seq_len=2048, global_batch=32, teacher_precision="fp8"))
    sp = Space(p, cost)
    by_group = {}
    for a in arrangements(p):
        if a.placement == "disaggregated":
            by_group.setdefault(a.teacher_group, set()).update(o.layout.forward_precision for o in sp.teacher_options(a))
    names = {g: p.cluster.groups[g].node.gpu for g in by_group}
    assert {names[g]: v for g, v in by_group.items()} == {"a100-80g": set(), "h100-80g": {"fp8"}}


@pytest.mark.parametrize("cluster,setting,pin,needle", [
    ("dgx-a100-80g", "fp8", None, "no fp8 tensor cores"),
    ("cpu-local", "int8", None, "no int8 tensor cores"),
    ("dgx-a100-80g", "bf16", "fp8", "no fp8 tensor cores"),
])
def test_unsupported_precision_is_bad_input(cluster, setting, pin, needle):
    with pytest.raises(InputError, match=needle):
        resolve(JobSpec(**{**SMALL, "cluster": cluster, "gpus": 2}), overrides={"teacher_precision": setting},
                pins=[f"teacher.precision={pin}"] if pin else None)


def test_job_file_key_and_contradicting_pin(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('teacher = "gpt-6.7b"\nstudent = "gpt-1.3b"\ncluster = "dgx-a100-80g"\ngpus = 4\n'
                   'teacher_precision = "int8"\n')
    p = resolve(load_job(str(job)), job_path=str(job))
    assert p.teacher_precisions == ("int8",)
    with pytest.raises(InputError, match="contradicts"):
        resolve(load_job(str(job)), pins=["teacher.precision=bf16"], job_path=str(job))


def test_layer_time_gemms_faster_by_peak_ratio_times_derating():
    p = resolve(JobSpec(teacher="llama-3-70b", student="llama-3-8b", cluster="dgx-h100", gpus=8))
    gpu, m = p.cluster.gpu_of_group(0), p.teacher
    exact = layer_time(m, gpu, "bf16", b=4, s=4096, tp=1)
    fp8 = layer_time(m, gpu, "bf16", b=4, s=4096, tp=1, gemm_precision="fp8")
    # the block's GEMMs: what is left of the forward without the attention core and the elementwise
    # work (compute.elementwise_s: memory bound, at the compute dtype)
    mm = exact.forward_s - exact.attn_core_s - elementwise_s(m, gpu, "bf16", tokens=4 * 4096, tp=1, block_gemm_s=0.0)
    speed = gpu.peak.fp8_tflops / gpu.peak.bf16_tflops * gpu.peak.low_precision_derating
    assert speed == pytest.approx(1.5, rel=1e-3)  # 1979 / 989 x 0.75
    # only the GEMMs drop, by peak ratio x derating; attention core and elementwise stay bf16
    assert exact.forward_s - fp8.forward_s == pytest.approx(mm * (1 - 1 / speed), rel=1e-9)
    assert fp8.attn_core_s == exact.attn_core_s
    assert 1 / speed < fp8.forward_s / exact.forward_s < 1


def test_teacher_price_time_and_weight_memory_drop():
    p = resolve(JobSpec(teacher="llama-3-70b", student="llama-3-8b", cluster="dgx-h100", gpus=8, seq_len=4096,
                        global_batch=64, teacher_precision="auto"))
    comp = Compression("dense")
    lo = Layout(tp=8, pp=1, dp=1, micro_batch=1, num_gpus=8, sequence_parallel=True)
    exact = cost.price_teacher(p, lo, compression=comp)
    low = {f: cost.price_teacher(p, lo.model_copy(update={"forward_precision": f}), compression=comp)
           for f in ("fp8", "int8")}
    m, q = p.teacher, 2
    blocks = m.num_layers * m.layer_params() / 8
    for f, pr in low.items():
        saved = (exact.memory_terms_gib["weights"] - pr.memory_terms_gib["weights"]) * 2**30
        # one byte per block weight saved, less the per-channel fp32 scales and exact norms
        assert saved == pytest.approx(blocks * (q - 1), rel=0.01)
        assert saved < blocks * (q - 1)
        assert block_weight_bytes(m, 8, q, f) < block_weight_bytes(m, 8, q, "bf16") * 0.51
        assert pr.memory_terms_gib["activations"] == exact.memory_terms_gib["activations"]
        assert 1 / 1.5 < pr.time_s / exact.time_s < 0.95
    assert low["fp8"].time_s == pytest.approx(low["int8"].time_s)  # same peak and derating on H100


def test_auto_picks_a_quantized_teacher_only_when_it_pays_and_keeps_baselines_exact():
    base = dict(teacher="llama-3-70b", student="llama-3-8b", cluster="dgx-h100", gpus=8, seq_len=4096,
                global_batch=64, kd={"allowed_compressions": ["topk:1024"]})
    pl = Planner()
    exact = pl.plan(resolve(JobSpec(**base)), top_k=0)
    auto = pl.plan(resolve(JobSpec(**base, teacher_precision="auto")), top_k=0)
    assert exact.teacher.layout.forward_precision == "bf16"
    assert auto.teacher.layout.forward_precision in ("fp8", "int8")
    assert auto.prediction.step_time_s < exact.prediction.step_time_s / (1 + TIE_TOLERANCE)
    assert "auto:" in auto.kd.teacher_precision_reason and "default" in exact.kd.teacher_precision_reason
    # mirror, naive and single keep the exact bf16 teacher: the same baselines in both plans
    for b in ("mirror", "naive_dp", "single_gpu"):
        assert getattr(auto.prediction.baselines, b).step_time_s == getattr(exact.prediction.baselines, b).step_time_s


def test_auto_keeps_the_exact_teacher_when_quantizing_buys_nothing():
    # disaggregated with a tiny teacher far faster than the student: its precision is off the
    # critical path, so auto must not trade fidelity for < 1%
    p = resolve(JobSpec(teacher="gpt-1.3b", student="gpt-6.7b", cluster="dgx-h100", gpus=8, seq_len=1024,
                        global_batch=16, teacher_precision="auto", kd={"allowed_compressions": ["topk:64:8"]}),
                pins=["kd.placement=disaggregated"])
    space, blocks, sol = Planner().search(p)
    ch = sol.choices[0]
    assert blocks[ch.block].teacher[ch.teacher].option.layout.forward_precision == "bf16"
    assert "within the 1% tie tolerance" in sol.teacher_precision_reason


@pytest.mark.parametrize("cluster", ["dgx-h100", "dgx-a100-80g"])
def test_ilp_equals_brute_force_over_precisions(cluster):
    p = resolve(JobSpec(**SMALL, cluster=cluster, teacher_precision="auto"))
    best, cand, tried = brute_force(p)
    assert cand is not None and tried > 500
    main, optimum = whole_space_optimum(Planner().price(p))  # the space with every allowed precision
    assert main.best()[1] == "optimal" and optimum == pytest.approx(best, rel=1e-9)
    space, blocks, sol = Planner().search(p)  # auto's choice: within the tolerance of that optimum
    ch = sol.choices[0]
    assert best - 1e-12 <= blocks[ch.block].step(ch.teacher, ch.student) <= best * (1 + TIE_TOLERANCE) + 1e-12
    if cand.teacher.forward_precision == "bf16":
        assert blocks[ch.block].teacher[ch.teacher].option.layout.forward_precision == "bf16"


@pytest.mark.parametrize("args,needle", [
    (["--teacher-precision", "fp4"], "teacher-precision"),
    (["--teacher-precision", "fp8"], "no fp8 tensor cores"),  # default cluster: A100
    (["--fix", "teacher.precision=fp16"], "expected one of"),
    (["--teacher", "none", "--teacher-precision", "int8"], "no teacher"),
])
def test_cli_bad_teacher_precision_exits_2(args, needle):
    r = run_kdplan("plan", "--json", "-o", "", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
