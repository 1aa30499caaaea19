"""The cost model against the development set of published runs (issue 3, item 8)."""

import math

import pytest

from kdplan.cost.validate import DEV_CSV, build_case, kendall_tau, read_rows, summarize, validate_csv
from kdplan.errors import InputError

SHARED_CSV = DEV_CSV.parent.parent.parent.parent / "shared" / "reference" / "published_runs_dev.csv"


@pytest.fixture(scope="module")
def results():
    return validate_csv(DEV_CSV)


@pytest.fixture(scope="module")
def by_source(results):
    return {s.source: s for s in summarize(results)}


def test_the_shipped_csv_is_the_reference_copy():
    if SHARED_CSV.exists():
        assert DEV_CSV.read_bytes() == SHARED_CSV.read_bytes()
    assert len(read_rows(DEV_CSV)) == 62


def test_every_row_is_priced(results):
    assert [r.row_id for r in results if r.skip] == []
    assert all(r.predicted_time_s for r in results if not r.oom)


def test_iteration_time_error_bars(by_source):
    assert by_source["narayanan2021"].time_rows == 22
    assert by_source["narayanan2021"].median_time_error <= 0.05
    assert by_source["bloom_bigscience"].time_rows == 37
    assert by_source["bloom_bigscience"].median_time_error <= 0.10


def test_memory_error_bar(by_source):
    s = by_source["bloom_bigscience"]
    assert s.memory_rows >= 20 and s.median_memory_error <= 0.10


def test_out_of_memory_rows_do_not_fit_and_the_others_do(results):
    wrong = [(r.row_id, r.oom, r.predicted_fits) for r in results if not r.fit_agrees]
    assert wrong == []
    assert sum(r.oom for r in results) == 3


def test_every_bloom_sweep_table_is_ranked(by_source):
    """The xfail below's precondition, outside it: seven tables, each with a Kendall tau."""
    taus = by_source["bloom_bigscience"].tau_by_table
    assert len(taus) == 7 and all(-1 <= t <= 1 for t in taus.values()), taus


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "not met: inside three BLOOM sweep tables the measured order is not monotonic in anything the "
    "model sees (e.g. 112 heads 15% slower than both 64 and 128; GBS 1568 as slow as 2048 on the same "
    "layout, PRE-07) and identical configs differ by 3% (PRE-21/22)"))
def test_ranking_inside_each_bloom_sweep_table(by_source):
    assert min(by_source["bloom_bigscience"].tau_by_table.values()) >= 0.8


def test_ranking_of_the_tables_that_vary_one_thing_at_a_time(by_source):
    """Where the measured order follows the layout (batch warm-up, pipeline depth, Megatron's
    scaling tables), the prediction ranks as measured."""
    for src, key, bar in (("bloom_bigscience", "Batchsize Warmup", 1.0), ("bloom_bigscience", "lower PP", 0.8),
                          ("narayanan2021", "Table 1", 0.9), ("narayanan2021", "Table 2", 0.9)):
        tau = next(v for k, v in by_source[src].tau_by_table.items() if key in k)
        assert tau >= bar, (src, key, tau)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((5 - 1) / 6)
    assert math.isnan(kendall_tau([1], [1]))


def test_unstated_fields_are_assumptions_on_the_row():
    rows = {r["row_id"]: r for r in read_rows(DEV_CSV)}
    t1 = build_case(rows["NAR21-T1-05"])
    assert t1.free_micro_batch and t1.layout.virtual_stages == 2 and t1.layout.schedule == "interleaved_1f1b"
    t2 = build_case(rows["NAR21-T2-10"])
    assert (t2.layout.tp, t2.layout.pp, t2.layout.dp) == (8, 35, 2)
    zero = build_case(rows["NAR21-T2-01"])
    assert zero.layout.zero == 3 and zero.layout.dp == 384
    bloom = build_case(rows["BLOOM-PRE-08"])
    assert bloom.problem.student.vocab_size == 250880 and bloom.measured_time_s == 114.11


def test_bad_csv_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="missing columns"):
        read_rows(bad)
    with pytest.raises(InputError, match="cannot read"):
        read_rows(tmp_path / "missing.csv")


def test_validate_command(kdplan_cli, tmp_path):
    r = kdplan_cli("validate")
    assert r.returncode == 0, r.stderr
    assert "narayanan2021" in r.stdout and "bloom_bigscience" in r.stdout
    r = kdplan_cli("validate", "--csv", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot read" in r.stderr


def test_run_reports_compare_their_prediction_with_the_measurement(kdplan_cli, tmp_path):
    from kdplan.schema.plan import Prediction
    from kdplan.schema.report import Measured, PlanRef, RunReport

    rep = RunReport(plan=PlanRef(path="plan.json", sha256="0" * 64), world_size=2, device="cpu", steps=5,
                    measured=Measured(step_time_s=0.5, tokens_per_s=100.0, utilization=0.5, peak_memory_gib=1.0),
                    predicted=Prediction(step_time_s=0.4, tokens_per_s=125.0, mfu=0.1, memory_per_gpu_gib=1.2,
                                         comm_bytes_per_step=0.0, utilization=0.6))
    path = tmp_path / "report.json"
    path.write_text(rep.model_dump_json())
    from kdplan.cost.validate import compare_reports
    [c] = compare_reports([str(path)])
    assert c.time_error == pytest.approx(-0.2) and c.memory_error == pytest.approx(0.2)
    r = kdplan_cli("validate", str(path))
    assert r.returncode == 0 and "-20.0%" in r.stdout and "20.0%" in r.stdout


def test_unknown_sources_use_their_rows_description(tmp_path):
    """Rows from a source without a cluster profile: the GPU's preset, the link rate and runtime the
    row names. The development set relabelled this way still meets the time bars."""
    text = DEV_CSV.read_text().replace(",narayanan2021,", ",other_megatron,").replace(
        ",bloom_bigscience,", ",other_bloom,")
    path = tmp_path / "other.csv"
    path.write_text(text)
    by = {s.source: s for s in summarize(validate_csv(path))}
    assert by["other_megatron"].median_time_error <= 0.05
    assert by["other_bloom"].median_time_error <= 0.10
    assert by["other_bloom"].fit_agree == by["other_bloom"].fit_rows


def test_link_rate_and_iteration_time_from_row_text():
    from kdplan.cost.validate import _inter_node_gb_per_s, _measured_time
    assert _inter_node_gb_per_s("8x 200 Gb/s HDR InfiniBand HCAs per node", 8) == 25.0
    assert _inter_node_gb_per_s("Omni-Path (OPA), 4 links per node", 8) == 6.25
    assert _inter_node_gb_per_s("InfiniBand", 8) is None
    row = dict(read_rows(DEV_CSV)[0])
    model = build_case(row).problem.student
    row.update(meas_tflops_per_gpu="", meas_samples_per_sec="128")
    assert _measured_time(row, model, 312.0)[0] == pytest.approx(512 / 128)
    row.update(meas_samples_per_sec="", meas_tokens_per_sec_total=str(512 * 2048 / 2))
    assert _measured_time(row, model, 312.0)[0] == pytest.approx(2.0)
