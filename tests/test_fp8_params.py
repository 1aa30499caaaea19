"""fp8 parameters (Overheads.fp8_params: NeMo FP8_PARAMS, Megatron-Core --fp8-param-gather): a
student trained in fp8 keeps its block Linear weights in fp8, so the distributed optimizer
all-gathers them at 1 byte and the GPU holds them at 1 byte (kdplan.cost.fp8.fp8_param_saving).
These would catch the all-gather or the memory still counting 2 bytes, the flag leaking into bf16
training, and validate not reading the MLPerf v4.0 rows' FP8_PARAMS."""

import pytest

from kdplan.cost.compose import price_student
from kdplan.cost.fp8 import FP8_WEIGHT_COPIES, block_linear_params, fp8_param_saving
from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows, states_fp8_params
from kdplan.jobs import JobSpec, resolve
from kdplan.schema.compression import Compression
from kdplan.schema.plan import Layout

DENSE = Compression("dense")
GIB = 2**30


def _problem(fp8_params: bool):
    p = resolve(JobSpec(teacher=None, student="gpt-13b", cluster="dgx-h100", gpus=64, seq_len=2048, global_batch=256))
    ov = p.cluster.overheads.model_copy(update={"fp8_params": fp8_params})
    return p.__class__(job=p.job, teacher=p.teacher, student=p.student,
                       cluster=p.cluster.model_copy(update={"overheads": ov}), pins=p.pins)


def _lay(**kw):
    return Layout(**{**dict(tp=2, pp=2, dp=16, micro_batch=1, zero=1, num_gpus=64, train_precision="fp8"), **kw})


def test_fp8_params_all_gather_one_byte_per_linear_weight():
    off, on = _problem(False), _problem(True)
    a = price_student(off, _lay(), compression=DENSE)
    b = price_student(on, _lay(), compression=DENSE)
    m, lay = off.student, _lay()
    # the weights' all-gather of the distributed optimizer moves (shard-1)/shard of each GPU's
    # weight bytes, on every GPU: 1 byte less per block Linear weight
    saved = sum(fp8_param_saving(m, n_layers=m.num_layers // lay.pp, tp=lay.tp, q=2) for _ in range(lay.pp))
    assert a.bytes_per_step["gradients"] - b.bytes_per_step["gradients"] == pytest.approx(
        (lay.dp - 1) / lay.dp * saved * lay.tp * lay.dp, rel=1e-9)  # every stage, tp * dp GPUs each
    assert b.time_s < a.time_s
    assert b.comm_exposed_s.get("gradients", 0) < a.comm_exposed_s.get("gradients", 0)


def test_fp8_params_hold_the_linear_weights_at_one_byte_and_only_the_transpose_cache():
    a = price_student(_problem(False), _lay(), compression=DENSE)
    b = price_student(_problem(True), _lay(), compression=DENSE)
    m, n, tp = _problem(False).student, _problem(False).student.num_layers // 2, 2
    linear = n * block_linear_params(m) / tp  # on the fullest stage's GPU
    assert (a.memory_terms_gib["weights"] - b.memory_terms_gib["weights"]) * GIB == pytest.approx(linear * 1, rel=1e-6)
    assert a.memory_terms_gib["fp8_weights"] * GIB == pytest.approx(linear * FP8_WEIGHT_COPIES, rel=1e-6)
    assert b.memory_terms_gib["fp8_weights"] * GIB == pytest.approx(linear * (FP8_WEIGHT_COPIES - 1), rel=1e-6)


def test_fp8_params_change_nothing_for_bf16_training():
    a = price_student(_problem(False), _lay(train_precision="job"), compression=DENSE)
    b = price_student(_problem(True), _lay(train_precision="job"), compression=DENSE)
    assert (a.time_s, a.memory_gib, a.bytes_per_step) == (b.time_s, b.memory_gib, b.bytes_per_step)


def test_validate_reads_fp8_params_from_the_mlperf_v40_rows_only():
    rows = [r for r in read_rows(EXTRA_CSV) if r["source_id"].startswith("mlperf")]
    flagged = {r["row_id"] for r in rows if build_case(r).problem.cluster.overheads.fp8_params}
    assert flagged == {r["row_id"] for r in rows if r["source_id"] == "mlperf_train_v40"} and flagged
    assert not states_fp8_params({"precision": "FP8 hybrid (Transformer Engine)"})
    assert not states_fp8_params({"precision": "fp8, FP8_PARAMS=False"})
    assert states_fp8_params({"precision": "FP8 hybrid (Transformer Engine) with FP8 parameters (FP8_PARAMS=True)"})
