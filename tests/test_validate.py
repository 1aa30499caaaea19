"""The cost model against published runs (issue 3 item 8, issue 13, issue 18 item 1).

The shipped efficiencies and runtime constants are fitted by code (kdplan/cost/fit.py, ``kdplan
validate --fit --write``) to every source of kdplan/data. So the numbers that say how well the model
generalises are the ones on rows left out of the fit (``leave_one_source_out``); the in-sample
numbers are kept as regressions and named "fit residual".
"""

import math
import re
import statistics
import shutil

import pytest

from kdplan.cost import fit as F
from kdplan.cost.validate import (ALL_CSVS, DEV_CSV, EXTRA_CSV, build_case, kendall_tau, read_rows, run_case,
                                  summarize, validate_csv)
from kdplan.errors import InputError

SHARED = DEV_CSV.parent.parent.parent.parent / "shared" / "reference"
SHARED_CSV = SHARED / "published_runs_dev.csv"
ISSUE_BAR_LEFT_OUT = 0.10  # issue 13: median step-time error <= 10% on every source when left out


@pytest.fixture(scope="module")
def all_cases():
    return [build_case(r) for p in ALL_CSVS for r in read_rows(p)] + F.block_cases()


@pytest.fixture(scope="module")
def loso(all_cases):
    full, rows = F.leave_one_source_out(all_cases)
    return full, {r.source: r for r in rows}


@pytest.fixture(scope="module")
def results():
    return validate_csv(DEV_CSV)


@pytest.fixture(scope="module")
def by_source(results):
    return {s.source: s for s in summarize(results)}


def test_the_shipped_csv_is_the_reference_copy():
    if SHARED_CSV.exists():
        assert DEV_CSV.read_bytes() == SHARED_CSV.read_bytes()
        assert EXTRA_CSV.read_bytes() == (SHARED / "published_runs_extra.csv").read_bytes()
        assert EXTRA_CSV.with_suffix(".md").read_bytes() == (SHARED / "published_runs_extra.md").read_bytes()
    assert len(read_rows(DEV_CSV)) == 62
    assert len(read_rows(EXTRA_CSV)) == 163


# ---- generalisation: rows left out of the fit -------------------------------------------------

def test_left_out_time_error_of_every_source_meets_the_bar(loso):
    """Issue 13's bar on every priced source, each left out of the fit (MLPerf v3.1 / v4.0 are fp8 and
    EasyContext's rows warm-up steps: never fitted, so left out = in-sample). Met since schema 1.11:
    the elementwise work priced by its counted bytes (compute.elementwise_s), the ZeRO-3 overlap
    slowdown only while the collective runs (role.overlapped_layer_s), one DeepSpeed per-block cost
    for BLOOM's and FlagPerf's DeepSpeed rows and the A100 attention efficiency pulled toward
    FlashAttention-2's measured rate (fit.py). Before them (session 9): fms-fsdp 11.3%, InternEvo
    11.0%, EasyContext 11.9%, the H200 blocks 24.7%."""
    _, by = loso
    priced = ("narayanan2021", "bloom_bigscience", "fms_fsdp_ibm", "olmo_core_readme", "internevo_perf",
              "flagperf_baai", "easycontext_2024", "mlperf_train_v31", "mlperf_train_v40", "h200_blocks")
    assert set(by) == set(priced)
    for src in priced:
        assert by[src].left_out[0] is not None and by[src].left_out[0] <= ISSUE_BAR_LEFT_OUT, (src, by[src].left_out)


def test_measured_h200_blocks_constrain_the_h100_curve(loso):
    """The H200 per-block timings are a source like the others: the H100-silicon curve and the
    dispatch floor fitted with them predict them (fit residual); left out, the floor keeps its
    prior and the ceiling comes from the published H100 rows alone (large GEMMs only), which
    miss them by more. Session 10 (schema 1.11, elementwise work by its bytes): 8.7% in-sample,
    9.2% left out; before, 3.8% and 24.7%: the shared H100 curve no longer bends to the blocks alone
    (the micro-batch-1 gpt-13b and llama-3-8b blocks are predicted 29% / 22% slow)."""
    _, by = loso
    assert by["h200_blocks"].in_sample[0] <= 0.09
    assert by["h200_blocks"].left_out[0] > by["h200_blocks"].in_sample[0]


def test_the_dispatch_floor_is_fitted_on_the_blocks_only(loso):
    """Left out, the H200 blocks leave the host-dispatch floor at its prior (the published rows run
    other blocks: fit.Param.sources); in the full fit the blocks place it."""
    full, by = loso
    left = by["h200_blocks"].fit
    assert "h100.op_dispatch_us" in left.untouched and left.values["h100.op_dispatch_us"] == 10.0
    assert "h100.op_dispatch_us" not in full.untouched


def test_a_constant_no_training_row_touches_keeps_its_prior(loso):
    # Only BLOOM runs on Jean Zay's network: left out, its Omni-Path efficiency is the prior.
    f = loso[1]["bloom_bigscience"].fit
    assert "jean-zay.inter_node_efficiency" in f.untouched
    assert f.values["jean-zay.inter_node_efficiency"] == 0.85


def test_the_fit_recovers_a_constant_it_generated(all_cases):
    """Rows whose 'measurement' is the model's own prediction at a known value: the fit finds it."""
    param = next(p for p in F.PARAMS if p.name == "jean-zay.inter_node_efficiency")
    truth = {param.name: 0.3}
    bloom = [c for c in all_cases if c.row["source_id"] == "bloom_bigscience" and not c.skip]
    synthetic = []
    for c in bloom:
        r = run_case(F.apply(c, truth, (param,)))
        if r.predicted_time_s:
            synthetic.append(F.dataclasses.replace(c, measured_time_s=r.predicted_time_s, measured_memory_gib=None))
    got = F.fit(synthetic, (param,), rounds=10).values[param.name]
    assert got == pytest.approx(0.3, rel=0.05)


def test_the_shipped_profiles_are_what_the_fit_command_writes(loso, tmp_path):
    """Fitting is code: re-running it reproduces the shipped constants (to the 4 digits written)."""
    from kdplan.profiles import load_cluster, load_hardware, profiles_dir

    full, _ = loso
    root = tmp_path / "profiles"
    shutil.copytree(profiles_dir(), root)
    files = F.write_profiles(full, root, date="test")
    assert {f.name for f in files} >= {"a100-80g.yaml", "h100-80g.yaml", "jean-zay-a100-80g.yaml"}
    for f in files:
        shipped = re.sub(r"(fitted by `kdplan validate --fit --write` on )\d{4}-\d{2}-\d{2}", r"\1test",
                         (profiles_dir() / f.parent.name / f.name).read_text())  # whatever day it was fitted
        assert f.read_text() == shipped, f"{f.name}: shipped values differ from `kdplan validate --fit --write`"
    a100 = load_hardware("a100-80g").efficiency
    assert a100.max_fraction == pytest.approx(full.values["a100.max_fraction"], rel=1e-3)
    assert "fitted by `kdplan validate --fit --write`" in a100.source
    jz = load_cluster("jean-zay-a100-80g")
    assert jz.overheads.layer_overhead_s == pytest.approx(full.values["deepspeed.layer_overhead_s"], rel=1e-3)


def test_every_extra_source_is_reported_and_every_skip_says_why():
    results = validate_csv(EXTRA_CSV)
    sources = {r.source for r in results}
    assert sources == {"fms_fsdp_ibm", "olmo_core_readme", "internevo_perf", "flagperf_baai", "easycontext_2024",
                       "mlperf_train_v31", "mlperf_train_v40"}
    skipped = {r.row_id: r.skip for r in results if r.skip}
    assert all(skipped.values())
    # fp8 training rows (MLPerf, OLMo-core float8, FlagPerf TE) are priced with Layout.train_precision
    # fp8 (tests/test_fp8_training.py), so nothing is skipped for its precision
    assert not [rid for rid in skipped if rid.startswith(("MLP", "OLMOC"))]
    # fms-fsdp "selective" checkpoints a fraction of the blocks it does not state, but its HFU/MFU
    # ratio does (tests/test_cost_fsdp_sources.py): priced
    assert not [rid for rid in skipped if rid.startswith("FMS")]
    # A800/H800 rows run on their own profiles (NVLink 400 GB/s both ways), not refused
    a800 = build_case(next(r for r in read_rows(EXTRA_CSV) if r["row_id"] == "FLAG-L2-7B-DS-01"))
    assert a800.problem.cluster.gpu_of_group(0).name == "a800-80g"
    assert a800.problem.cluster.groups[0].node.intra_node.bandwidth_gb_per_s == 200


def test_every_row_is_priced(results):
    assert [r.row_id for r in results if r.skip] == []
    assert all(r.predicted_time_s for r in results if not r.oom)


# ---- fit residuals: in-sample regressions (the constants were fitted to these rows) ----------

def test_iteration_time_fit_residual(by_source):
    assert by_source["narayanan2021"].time_rows == 22
    assert by_source["narayanan2021"].median_time_error <= 0.05
    assert by_source["bloom_bigscience"].time_rows == 37
    assert by_source["bloom_bigscience"].median_time_error <= 0.10


def test_memory_fit_residual(by_source):
    s = by_source["bloom_bigscience"]
    assert s.memory_rows >= 20 and s.median_memory_error <= 0.10


def test_out_of_memory_rows_do_not_fit_and_the_others_do_fit_residual(results):
    wrong = [(r.row_id, r.oom, r.predicted_fits) for r in results if not r.fit_agrees]
    assert wrong == []
    assert sum(r.oom for r in results) == 3


def test_every_bloom_sweep_table_is_ranked(by_source):
    """The xfail below's precondition, outside it: seven tables, each with a Kendall tau."""
    taus = by_source["bloom_bigscience"].tau_by_table
    assert len(taus) == 7 and all(-1 <= t <= 1 for t in taus.values()), taus


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "not met, and not explained by the inputs: tau counts only pairs measured further apart than "
    "BLOOM's repeat noise (2.8%: PRE-21/22, one table, one config, 110.48 s vs 113.54 s, single-"
    "iteration snapshots); what is left is discordant on rows that contradict the same table: PRE-07 "
    "(GBS 1568) 113.0 s vs PRE-08 (GBS 2048, same layout) 114.1 s, while the table's other 1568/2048 "
    "twins differ by 21-22% (PRE-10/11, PRE-12/13); PRE-04 (112 heads) 11.1% slower than PRE-05 (128 "
    "heads) at equal FLOPs; PRE-33 (128 heads, mb 4) 20.6% slower than mb 2 (PRE-32) where 64 heads "
    "differ by 1.3% (PRE-20/21): head-count kernel effects kdplan does not price. Tables left below "
    "0.8: NHEADs 02-23 0.20, GBS Variations 0.58, Tweaking TP 0.75, lower PP 0.78 (PRE-14 vs PRE-15 ranked the "
    "wrong way round since the session-6 refit). That pair (pp8 mb4 113.2 s, pp4 mb2 125.5 s, both 84 "
    "micro-batches) turns on halving the micro-batch, which at tp8 was measured 7.7% / 10.0% / 9.3% slower "
    "(PRE-10->12, 11->13, 16->15; predicted +0.1% / +1.1% / +1.8%) and at tp4 1.3% / 4.6% faster (PRE-20->21, "
    "23->24; predicted 4.0% / 3.6% faster), with every GEMM above 200 GFLOP and 36-72 GiB of the 80 in use: "
    "no pipeline, p2p or efficiency term of the inputs makes the same step cost 8-10% at tp8 only"))
def test_ranking_inside_each_bloom_sweep_table(by_source):
    assert min(by_source["bloom_bigscience"].tau_by_table.values()) >= 0.8


def test_ranking_of_the_tables_that_vary_one_thing_at_a_time(by_source):
    """Where the measured order follows the layout (batch warm-up, pipeline depth, Megatron's
    scaling tables), the prediction ranks as measured."""
    # BLOOM's "lower PP" table was here at 0.8: the session-6 fit (two starts, InternEvo's runtime) ranks PRE-14
    # against PRE-15 the wrong way round, 0.78; it is in the strict xfail above now.
    for src, key, bar in (("bloom_bigscience", "Batchsize Warmup", 1.0),
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
    r = kdplan_cli("validate", "--write")
    assert r.returncode == 2 and "--write needs --fit" in r.stderr


def test_fit_command_prints_constants_and_fit_residual(kdplan_cli):
    r = kdplan_cli("validate", "--fit", "--csv", str(DEV_CSV))
    assert r.returncode == 0, r.stderr
    assert "a100.max_fraction" in r.stdout and "fit residual" in r.stdout
    assert "narayanan2021" in r.stdout and "bloom_bigscience" in r.stdout


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


# ---- issue 13 (costtime): rows that were not priced, networks, latency at scale -------------

def _row(rid):
    return next(r for p in ALL_CSVS for r in read_rows(p) if r["row_id"] == rid)


def test_easycontext_plain_data_parallel_row_and_ring_rows_are_priced():
    dp = run_case(build_case(_row("EZCTX-01")))
    assert not dp.skip and dp.predicted_time_s and dp.measured_time_s == pytest.approx(8 * 65536 / 10240)
    assert build_case(_row("EZCTX-01")).problem.job.seq_len == 65536
    assert build_case(_row("EZCTX-01")).layout.offload == "optimizer"
    for rid in ("EZCTX-02", "EZCTX-05"):  # ring attention over 8 GPUs: Layout.cp (tests/test_context_parallel.py)
        case = build_case(_row(rid))
        assert not case.skip and case.layout.cp == 8 and case.layout.num_gpus == 8


def test_roce_link_text_sets_the_per_gpu_rate():
    # "4 x 100 Gb RoCE per machine" over 8 GPUs: 50 Gb/s = 6.25 GB/s per GPU (was read as the preset's 25)
    c = build_case(_row("IEVO-THR-08"))
    assert c.problem.cluster.groups[0].node.inter_node.bandwidth_gb_per_s == pytest.approx(6.25)


def test_internevo_gpu_count_sweeps_rank_as_measured():
    """The (tp, ZeRO-1) weak-scaling sweeps on 8-1,024 A100 ranked backwards (tau -1) while the
    network rate was misread and the weights' all-gather hid under the backward."""
    s = {x.source: x for x in summarize(validate_csv(EXTRA_CSV))}["internevo_perf"]
    taus = [t for k, t in s.tau_by_table.items() if "Parallel Configuration" in k]
    assert len(taus) == 4 and min(taus) >= 0.8, taus


def test_left_out_bars_after_the_network_terms(loso):
    """Left-out medians as they stand after issue 13's network and latency terms (`kdplan validate
    --leave-one-source-out`); a change that makes one worse fails."""
    _, by = loso
    # session 10 (schema 1.11, kdplan validate --leave-one-source-out): narayanan 3.5%, internevo 7.4%,
    # olmo 5.6%, fms 7.4%, flagperf 6.8%, bloom 6.9%, easycontext 8.4%, h200 blocks 9.2%; the bars
    # leave about a point for the pattern search's path (the left-out fits start from the priors).
    # Schema 1.12: easycontext 7.9% (its optimizer offload at DGX A100's shared host uplink rate).
    bars = {"narayanan2021": 0.05, "internevo_perf": 0.09, "olmo_core_readme": 0.07, "fms_fsdp_ibm": 0.09,
            "flagperf_baai": 0.08, "bloom_bigscience": 0.08, "easycontext_2024": 0.09, "h200_blocks": 0.10}
    for src, bar in bars.items():
        assert by[src].left_out[0] is not None and by[src].left_out[0] <= bar, (src, by[src].left_out[0])


def test_left_out_fms_eager_rows_are_priced_with_the_counted_passes(loso, all_cases):
    """fms-fsdp is the only source whose PyTorch blocks ran op by op (its first two README tables,
    no torch.compile): left out, eager.elementwise_passes acts on no training row and keeps its
    prior, the passes counted for a Llama block run op by op (fit.py). At a prior of 0 its H100
    eager rows were predicted 10-27% fast (median 18%: memory-bound passes cost an H100, 3.2x an
    A100's compute on 1.6x its bandwidth, twice the share of a step)."""
    lo = loso[1]["fms_fsdp_ibm"]
    prior = next(p.prior for p in F.PARAMS if p.name == "eager.elementwise_passes")
    assert "eager.elementwise_passes" in lo.fit.untouched and lo.fit.values["eager.elementwise_passes"] == prior > 0
    held = [c for c in all_cases if c.row["source_id"] == "fms_fsdp_ibm" and c.row["row_id"].startswith("FMS-T2-H100")]
    errors = [abs(r.time_error) for r in F.price_with(held, lo.fit.values)]
    assert len(errors) == 4 and statistics.median(errors) <= 0.12, errors


def test_a_source_of_fewer_rows_than_the_fit_minimum_does_not_steer_it(all_cases):
    assert F.MIN_FIT_ROWS == 3
    two = [c for c in all_cases if c.row["source_id"] == "narayanan2021"][:2]
    bloom = [c for c in all_cases if c.row["source_id"] == "bloom_bigscience"]
    assert {c.row["source_id"] for c in F._Pricer(two + bloom, F.PARAMS).cases} == {"bloom_bigscience"}


def test_rows_timed_over_a_runs_first_steps_are_reported_not_fitted(loso, all_cases):
    """EasyContext times its runs "for the first 5 training steps, so expect some variance": warm-up
    the cost model's steady-state steps do not hold. Its five rows are priced (ring attention:
    Layout.cp) and reported, in-sample equal to left out, but do not steer the fit."""
    ez = [c for c in all_cases if c.row["source_id"] == "easycontext_2024"]
    assert len(ez) == 5 and all(c.warm_up and not c.skip for c in ez)
    assert not any(c.warm_up for c in all_cases if c.row["source_id"] != "easycontext_2024")
    assert "easycontext_2024" not in loso[0].sources
    _, by = loso
    assert by["easycontext_2024"].in_sample == by["easycontext_2024"].left_out


def test_validate_prints_user_paths_literally(kdplan_cli, tmp_path):
    """A CSV path with rich markup in it is printed as written, not styled or refused."""
    import shutil

    from kdplan.cost.validate import ALL_CSVS
    d = tmp_path / "[bold]runs"
    d.mkdir()
    csv = d / "runs.csv"
    shutil.copy(ALL_CSVS[0], csv)
    r = kdplan_cli("validate", "--csv", csv)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[bold]runs" in "".join(r.stdout.split())


# ---- memory left out, and no layout that ran refused as out of memory (issue 13) ---------------

ISSUE_BAR_MEMORY = 0.10  # issue 13: median memory error <= 10% on every source with memory rows


def test_left_out_memory_error_of_the_sources_that_meet_the_bar(loso):
    """InternEvo left out prices its memory rows with its runtime's priors (the optimizer step's
    fp32 gradient copy and AdamW temporaries counted from its source): 38% before that term.
    BLOOM left out takes DeepSpeed's allocator reserve from FlagPerf's DeepSpeed rows: 10.8%
    before those rows counted Hugging Face's eager norms and DeepSpeed's step copies and the
    reserve was counted on what is allocated every step only."""
    for src in ("internevo_perf", "bloom_bigscience"):
        left = loso[1][src].left_out[1]
        assert left is not None and left <= ISSUE_BAR_MEMORY, (src, left)


@pytest.mark.parametrize("src", ["flagperf_baai"])
def test_left_out_memory_error_of_the_sources_that_do_not_yet(loso, src):
    """Issue 13's memory bar, not met yet (FlagPerf left out 12.6%, in-sample 9.0%; 14.2% before
    Megatron-core's and PaddleNLP's second fp32 copy of the logits was counted): left out, its 20
    Paddle rows take the schema's 2 GiB runtime memory instead of the 7.4 GiB fitted on them, and its
    Megatron-core / FlagScale tp >= 2 rows are 5-14 GiB under, a surplus that scales with the
    parameters on the GPU (benchmarks/results/memory-rows-2026-12-04/README.md), while its tp1
    pipeline rows are 5-7 GiB over. `python benchmarks/memory_rows.py --surplus selene-a100-80g`
    fits that surplus by candidate term (benchmarks/results/memory-rows-2026-12-05/README.md): NCCL
    buffers per communicator fit worse than a constant; bytes per parameter close the tp >= 2 rows
    only with a tp1-only activation saving no source explains. The precondition (memory rows
    priced) is outside the expected failure."""
    left = loso[1][src].left_out[1]
    assert left is not None
    if left > ISSUE_BAR_MEMORY:
        pytest.xfail(f"{src} memory left out: {left:.1%} > {ISSUE_BAR_MEMORY:.0%} (issue 13 open)")
    assert left <= ISSUE_BAR_MEMORY


def test_no_layout_that_ran_is_predicted_out_of_memory():
    """Every priced row of every source: a run that ran fits, one that ran out of memory does not
    (FLAG-GLM3-6B-01 was predicted at 122 GiB with the s x s scores stored; ChatGLM3's modeling
    code calls torch's SDPA)."""
    results = [r for p in ALL_CSVS for r in validate_csv(p) if not r.skip]
    wrong = [(r.row_id, r.oom, round(r.predicted_memory_gib or 0, 1)) for r in results
             if r.fit_known and not r.fit_agrees]
    assert wrong == []
    glm = next(r for r in results if r.row_id == "FLAG-GLM3-6B-01")
    assert glm.predicted_fits and abs(glm.memory_error) < 0.5


def test_no_layout_that_ran_on_gpus_of_unstated_memory_is_predicted_out_of_memory():
    """Issue 13's bar on the rows whose GPU memory size the source does not state (EasyContext's
    A100s, priced on the 80 GB one). Its 700K-token ring row (EZCTX-05) was predicted at 87.7 GiB
    (2026-12-04) with the recomputed block's working set (16.2 GiB) summed with the logits (16.0),
    which are freed before the first block is recomputed (role.recomputed_block_peak_bytes)."""
    results = [r for r in validate_csv(EXTRA_CSV) if not r.skip and not r.fit_known]
    assert len(results) == 5 and all(r.predicted_memory_gib for r in results)
    wrong = [(r.row_id, round(r.predicted_memory_gib, 1)) for r in results if not r.oom and not r.predicted_fits]
    assert wrong == []
    longest = next(r for r in results if r.row_id == "EZCTX-05")
    assert longest.predicted_fits and longest.predicted_memory_gib < 80


def test_hsdp_rows_are_priced_as_hybrid_sharding():
    """fms-fsdp's HSDP rows (full shard inside an 8-GPU node, replicated across nodes) and
    InternEvo's zero1=N rows run with Layout.shard_group, not refused and not widened to dp."""
    rows = {r["row_id"]: r for r in read_rows(EXTRA_CSV)}
    for rid in ("FMS-T1-01", "FMS-T2-H100-01", "FMS-T3-A100-01"):
        c = build_case(rows[rid])
        assert not c.skip and c.layout.zero == 3 and c.layout.shard_group == 8 and c.layout.dp > 8
        assert run_case(c).predicted_fits
    ievo = build_case(rows["IEVO-THR-10"])  # dp 16, zero1=8
    assert ievo.layout.zero == 1 and ievo.layout.shard_group == 8


def test_eager_passes_act_only_on_rows_whose_blocks_ran_op_by_op(all_cases):
    """eager.elementwise_passes is priced on op-by-op blocks only (role.py): it acts on fms-fsdp's
    tables without torch.compile and on no compiled row of the same runtimes (OLMo-core, fms-fsdp's
    third table), so a fit without those tables leaves it at its counted prior."""
    p = next(p for p in F.PARAMS if p.name == "eager.elementwise_passes")
    acting = {c.row["row_id"] for c in all_cases if p.acts_on(c)}
    assert acting and all(r.startswith(("FMS-T1-", "FMS-T2-")) for r in acting), sorted(acting)
    assert not any(r.startswith(("OLMOC-", "FMS-T3-")) for r in acting)
    assert p.prior > 0
    held = [c for c in all_cases if c.row["source_id"] != "fms_fsdp_ibm"]
    assert p.name in F.fit(held, (p,), rounds=1).untouched
