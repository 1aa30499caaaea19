"""fp8 student training (Layout.train_precision = "fp8", --student-precision fp8): what the job
allows, what the hardware supports, what the cost model charges (kdplan/cost/fp8.py, Transformer
Engine's rule), that the executor refuses it, and that kdplan validate prices the published fp8
runs without letting them steer the fit."""

import json

import pytest

from kdplan import cost
from kdplan.cost.compose import price_student
from kdplan.cost.compute import layer_time
from kdplan.cost.fp8 import FP8_WEIGHT_COPIES, block_linear_params, fp8_saved_input_saving
from kdplan.cost.memory import activation_bytes_per_layer
from kdplan.errors import InputError
from kdplan.jobs import JobSpec, resolve
from kdplan.schema.capability import layout_unsupported
from kdplan.schema.compression import Compression
from kdplan.schema.plan import Layout
from kdplan.search.candidates import arrangements
from kdplan.search.space import Space

from conftest import run_kdplan

DENSE = Compression("dense")
PLAIN = dict(teacher=None, student="gpt-1.3b", gpus=8, seq_len=2048, global_batch=64)


def _problem(cluster="dgx-h100", **kw):
    return resolve(JobSpec(**{**PLAIN, "cluster": cluster, **kw}))


def _lay(**kw):
    base = dict(tp=1, pp=1, dp=8, micro_batch=2, num_gpus=8)
    return Layout(**{**base, **kw})


def test_fp8_prices_the_gemms_only_faster_than_bf16_and_under_2x():
    p = _problem()
    gpu = p.cluster.gpu_of_group(0)
    bf = layer_time(p.student, gpu, "bf16", b=2, s=2048, tp=1)
    f8 = layer_time(p.student, gpu, "bf16", b=2, s=2048, tp=1, gemm_precision="fp8")
    assert f8.attn_core_s == pytest.approx(bf.attn_core_s)  # the attention core stays 16-bit
    assert f8.device_forward_s < bf.device_forward_s
    one = price_student(p, _lay(), compression=DENSE)
    low = price_student(p, _lay(train_precision="fp8"), compression=DENSE)
    assert low.fits and one.fits
    # the GEMMs at most 2 x derating faster: the whole step gains less than that
    assert 1.05 < one.time_s / low.time_s < 2 * gpu.peak.low_precision_derating
    assert low.model_flops == one.model_flops  # same work, counted the same


def test_fp8_memory_is_the_weight_cache_plus_fp8_saved_inputs():
    p = _problem()
    m = p.student
    one = price_student(p, _lay(), compression=DENSE)
    low = price_student(p, _lay(train_precision="fp8"), compression=DENSE)
    cache = m.num_layers * block_linear_params(m) * FP8_WEIGHT_COPIES
    assert low.memory_terms_gib["fp8_weights"] * 2**30 == pytest.approx(cache)
    assert "fp8_weights" not in one.memory_terms_gib
    # activations: the four GEMM inputs of each block at 1 B instead of 2 (b=2, s=2048, h, f)
    h, f = m.hidden_size, m.ffn_hidden_size
    saved = 2 * 2048 * (2 * h + m.q_width + f)
    assert fp8_saved_input_saving(m, b=2, s=2048, tp=1, sequence_parallel=False, q=2, recompute="none") == saved
    drop = (one.memory_terms_gib["activations"] - low.memory_terms_gib["activations"]) * 2**30
    assert drop == pytest.approx(m.num_layers * saved)
    # the saving is part of what a block stores, never more
    assert saved < activation_bytes_per_layer(m, b=2, s=2048, flash=True)
    # full recompute stores only block inputs: nothing to save
    assert fp8_saved_input_saving(m, b=2, s=2048, tp=1, sequence_parallel=False, q=2, recompute="full") == 0
    # under ZeRO-3 only the gathered block's fp8 copies live
    z3 = price_student(p, _lay(zero=3, train_precision="fp8"), compression=DENSE)
    assert z3.memory_terms_gib["fp8_weights"] * 2**30 == pytest.approx(block_linear_params(m) * FP8_WEIGHT_COPIES)


def test_fp8_is_invalid_without_fp8_tensor_cores_or_outside_bf16():
    a100 = _problem("dgx-a100-80g")
    price = price_student(a100, _lay(train_precision="fp8"), compression=DENSE)
    assert not price.fits and price.time_s == float("inf") and "no fp8 tensor cores" in price.why
    with pytest.raises(InputError, match="no fp8 tensor cores"):
        _problem("dgx-a100-80g", student_precision="fp8")
    with pytest.raises(InputError, match="precision bf16"):
        _problem(student_precision="fp8", precision="fp16")


def test_the_solver_offers_fp8_only_when_asked():
    def student_precisions(p):
        sp = Space(p, cost)
        return {o.layout.train_precision for a in arrangements(p)
                for o in sp.options("student", a.student_gpus, a.student_groups)}

    assert student_precisions(_problem()) == {"job"}  # default: never chosen
    assert student_precisions(_problem(student_precision="fp8")) == {"fp8"}


def test_the_executor_refuses_fp8_through_the_capability_table():
    why = layout_unsupported("student", _lay(train_precision="fp8"), _problem().student)
    assert why is not None and why.feature == "student_fp8"
    assert "student.layout.train_precision = fp8" in why.message and "--student-precision job" in why.message
    assert layout_unsupported("student", _lay(), _problem().student) is None


def test_a_teacher_never_trains_in_fp8():
    from pathlib import Path

    from pydantic import ValidationError

    from kdplan.schema import Plan

    data = json.loads((Path(__file__).parent / "golden" / "plans" / "seed.json").read_text())
    assert data["teacher"]["layout"]["train_precision"] == "job"
    data["teacher"]["layout"]["train_precision"] = "fp8"
    with pytest.raises(ValidationError, match="teacher.layout.train_precision"):
        Plan.model_validate(data)


def test_cli_plans_fp8_and_marks_it_not_runnable(tmp_path):
    args = ["--teacher", "none", "--student", "gpt-1.3b", "--cluster", "dgx-h100", "--gpus", "8",
            "--seq-len", "2048", "--global-batch", "64"]
    r = run_kdplan("plan", *args, "--student-precision", "fp8", "-o", tmp_path / "fp8.json")
    assert r.returncode == 0, r.stderr
    r2 = run_kdplan("plan", *args, "-o", tmp_path / "bf16.json")
    assert r2.returncode == 0, r2.stderr
    low, one = (json.loads((tmp_path / f).read_text()) for f in ("fp8.json", "bf16.json"))
    assert low["student"]["layout"]["train_precision"] == "fp8"
    assert one["student"]["layout"]["train_precision"] == "job"
    assert low["prediction"]["step_time_s"] < one["prediction"]["step_time_s"]
    # the baselines train the student as the plan does (a speedup is the layout's, not fp8's)
    assert low["prediction"]["baselines"]["single_gpu"]["student"]["train_precision"] == "fp8"
    assert one["prediction"]["baselines"]["single_gpu"]["student"]["train_precision"] == "job"
    assert low["executor"]["runnable"] is False
    assert any("train_precision" in u for u in low["executor"]["unsupported"])


@pytest.mark.parametrize("args,needle", [
    (["--student-precision", "fp4"], "student-precision"),
    (["--student-precision", "fp8"], "no fp8 tensor cores"),  # default cluster: A100
    (["--student-precision", "fp8", "--cluster", "dgx-h100", "--precision", "fp32"], "precision bf16"),
])
def test_cli_bad_student_precision_exits_2(args, needle):
    r = run_kdplan("plan", "--json", "-o", "", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_validate_prices_the_fp8_rows_and_keeps_them_out_of_the_fit():
    from kdplan.cost.fit import _Pricer
    from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, run_case, trains_in_fp8

    rows = [r for r in read_rows(EXTRA_CSV) if trains_in_fp8(r)]
    assert len(rows) >= 15  # OLMo-core 4, FlagPerf 2, MLPerf v3.1 7 and v4.0 2
    cases = [build_case(r) for r in rows]
    for c in cases:
        assert not c.skip, (c.row["row_id"], c.skip)
        assert c.layout.train_precision == "fp8" and c.problem.job.precision == "bf16"
        res = run_case(c)
        assert res.predicted_time_s and res.predicted_fits, (c.row["row_id"], res.why)
    bf16 = [build_case(r) for r in read_rows(EXTRA_CSV) if r["source_id"] == "olmo_core_readme" and not trains_in_fp8(r)]
    kept = _Pricer(cases + bf16, ()).cases
    assert kept and all(c.layout.train_precision == "job" for c in kept)


def test_overlapped_tp_and_p2p_show_only_what_outlasts_compute():
    """Overheads.overlap_tp_comm / overlap_p2p_comm (MLPerf's NeMo runs): exposed communication
    drops, never below one chunk of tp for the collectives, never below zero for the sends."""
    import dataclasses

    p = resolve(JobSpec(teacher=None, student="gpt-13b", cluster="dgx-h100", gpus=64, seq_len=2048, global_batch=128))
    lay = Layout(tp=4, pp=4, dp=4, micro_batch=1, virtual_stages=2, schedule="interleaved_1f1b",
                 sequence_parallel=True, num_gpus=64)

    def priced(**ov):
        cl = p.cluster.model_copy(update={"overheads": p.cluster.overheads.model_copy(update=ov)})
        return price_student(dataclasses.replace(p, cluster=cl), lay, compression=DENSE)

    base, tpo, p2po = priced(), priced(overlap_tp_comm=True), priced(overlap_p2p_comm=True)
    tp0, tp1 = base.comm_exposed_s["tensor_parallel"], tpo.comm_exposed_s["tensor_parallel"]
    assert tp0 / lay.tp - 1e-12 <= tp1 < tp0
    assert p2po.comm_exposed_s.get("pipeline", 0.0) < base.comm_exposed_s["pipeline"]
    assert tpo.time_s < base.time_s and p2po.time_s < base.time_s
    assert tpo.compute_s == pytest.approx(base.compute_s)
