"""`kdplan whatif` over whole jobs (issue 16): students, dataset_tokens and storage bandwidth
swept through the CLI on the tiny CPU example (4 processes, 1e7 tokens per student), and the
axes documented in --help. Planner only: no torch.

The teacher is the example's widened to 8 x 1,024 (same 8,192-token vocabulary): with the
calibrated cpu-local the example's own 4 x 256 teacher costs 0.05 s of a 0.29 s step, and a
teacher-output cache does not pay for itself at 4 epochs (offline 0.3871 h vs online 0.3870 h), so
"the cache pays" needs a teacher that is a real share of the step, as in the distillations people run."""

import json

import pytest

from conftest import ROOT, run_kdplan

TINY = ROOT / "examples" / "tiny-cpu"
CACHE = ("offline", "online_then_cache")  # the strategies that write a teacher-output cache
A, B = TINY / "student" / "config.json", TINY / "student-b" / "config.json"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    c = json.loads((TINY / "teacher" / "config.json").read_text())
    c.update(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8)
    path = tmp_path_factory.mktemp("teacher") / "config.json"
    path.write_text(json.dumps(c))
    return path


def _whatif(teacher, *args):
    r = run_kdplan("whatif", TINY / "job.toml", "--teacher", teacher, "--tokens", "1e7", "--gpus", "4", *args,
                   "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_whatif_sweeps_students_and_dataset_tokens(teacher):
    rows = _whatif(teacher, "--sweep", f"students={A},{A}+{B}", "--sweep", "dataset_tokens=1e7,2.5e6")
    assert [(r["students"].count("+") + 1, float(r["dataset_tokens"])) for r in rows] == [
        (1, 1e7), (1, 2.5e6), (2, 1e7), (2, 2.5e6)]
    assert [r["whole_job.epochs"] for r in rows] == [1.0, 4.0, 1.0, 4.0]
    for r in rows:
        assert r["feasible"] and r["whole_job.total_time_s"] > 0
        assert r["whole_job.students_arrangement"] in ("one_after_another", "side_by_side", "in_turn_each_step")
        # a cache runs the teacher once per unique token; without one it reruns it every epoch
        assert r["whole_job.teacher_passes"] == (1.0 if r["whole_job.cache_bytes"] else r["whole_job.epochs"]) \
            or r["whole_job.strategy"] == "separate_online"
    # a second student costs time at both corpus sizes
    assert rows[2]["whole_job.total_time_s"] > rows[0]["whole_job.total_time_s"]
    assert rows[3]["whole_job.total_time_s"] > rows[1]["whole_job.total_time_s"]
    # four epochs over a quarter of the tokens: the cache pays (one teacher pass), written by a pass of its
    # own or by the first epoch online (0.7235 h vs 0.7205 h after session 8's cost terms: which wins is
    # within 0.5%, and not what this test is about)
    assert rows[1]["whole_job.strategy"] in CACHE and rows[1]["whole_job.teacher_passes"] == 1.0


def test_whatif_sweeps_storage_bandwidth(teacher):
    rows = _whatif(teacher, "--dataset-tokens", "2.5e6", "--sweep", "storage_bw_scale=1,1e-3")
    assert [float(r["storage_bw_scale"]) for r in rows] == [1.0, 1e-3]
    # the profile's storage makes the 4-epoch cache pay; at a thousandth of its bandwidth it does not
    assert rows[0]["whole_job.strategy"] in CACHE and rows[0]["whole_job.teacher_passes"] == 1.0
    assert rows[1]["whole_job.strategy"] not in CACHE and rows[1]["whole_job.teacher_passes"] == 4.0
    assert rows[1]["whole_job.total_time_s"] > rows[0]["whole_job.total_time_s"]


def test_whatif_help_names_the_whole_job_axes():
    r = run_kdplan("whatif", "--help", env={"COLUMNS": "400"})
    assert r.returncode == 0
    for key in ("students", "dataset_tokens", "storage_bw_scale", "storage_capacity_scale"):
        assert key in r.stdout, key


def test_whatif_table_has_the_whole_job_strategy(teacher):
    """The table (not only --json) says which whole-job strategy each point chose, with its hours and
    speedup over separate mirror jobs: a strategy sweep without it is unreadable."""
    args = ("--dataset-tokens", "2.5e6", "--sweep", "storage_bw_scale=1,1e-3")
    rows = _whatif(teacher, *args)
    r = run_kdplan("whatif", TINY / "job.toml", "--teacher", teacher, "--tokens", "1e7", "--gpus", "4", *args)
    assert r.returncode == 0, r.stderr
    head = r.stdout.split("┡")[0]
    assert "job strategy" in head and "job hours" in head
    body = r.stdout.split("┡")[1]
    strategies = [row["whole_job.strategy"] for row in rows]
    assert len(set(strategies)) == 2  # a cache, then none at a thousandth of the bandwidth
    for s in strategies:
        assert s in body, (s, body)
    for row in rows:
        assert f"{row['whole_job.total_time_s'] / 3600:,.2f}" in body
