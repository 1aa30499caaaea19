"""Schema versions: a file of an older 1.x minor is read by today's planner and executor (every
later field is additive, with a default that means what the older format did); a newer minor or
another major is refused in one line naming both versions (kdplan.schema.common.schema_version_error).

Older plans are real: tests/data/old-plans/ holds the seed example planned by the kdplan of each
minor 1.0-1.4 (its README names the commits), and tests/data/calibration-loop-2026-11-28/ the 1.0
plans and reports of a calibration run. The executor is driven as a subprocess
(``python -m executor.launch --check-only``: no torch), so these stay planner-tier tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_kdplan

from kdplan.calibrate.calibrate import load_case
from kdplan.errors import InputError
from kdplan.io import load_model
from kdplan.schema import SCHEMA_VERSION, ClusterFile, JobSpec, Plan, RunReport, schema_version_error

OLD = ROOT / "tests" / "data" / "old-plans"
OLD_PLANS = sorted(OLD.glob("seed-1.*.json"))
LOOP = ROOT / "tests" / "data" / "calibration-loop-2026-11-28"
MAJOR, MINOR = map(int, SCHEMA_VERSION.split("."))
NEWER = f"{MAJOR}.{MINOR + 1}"


def check_only(path, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "executor.launch", str(path), "--check-only", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_version_rule():
    assert schema_version_error(SCHEMA_VERSION) is None
    assert all(schema_version_error(f"{MAJOR}.{m}") is None for m in range(MINOR))
    for bad in (NEWER, f"{MAJOR + 1}.0", f"{MAJOR - 1}.9", "1", "1.x", "1.5.0", "", None, 1.5):
        why = schema_version_error(bad, kind="plan", reader="executor")
        assert why is not None and "\n" not in why and SCHEMA_VERSION in why and "executor" in why, (bad, why)
        if isinstance(bad, str) and bad:
            assert bad in why
    assert "newer" in schema_version_error(NEWER) and "major" in schema_version_error(f"{MAJOR + 1}.0")


def test_the_old_plans_are_what_their_versions_wrote():
    """The fixtures are of the versions they claim, and older minors really lack later fields
    (else the tests below would read current plans)."""
    versions = [json.loads(p.read_text())["schema_version"] for p in OLD_PLANS]
    assert versions == [f"1.{m}" for m in range(5)]
    first = json.loads(OLD_PLANS[0].read_text())
    assert "vocab_size" not in first["kd"] and "shard_group" not in first["student"]["layout"]
    assert "signal" not in json.loads(OLD_PLANS[3].read_text())["kd"]


@pytest.mark.parametrize("path", OLD_PLANS, ids=[p.stem for p in OLD_PLANS])
def test_an_older_plan_is_read_by_the_planner_and_accepted_by_the_executor(path):
    plan = load_model(Plan, path)
    assert plan.schema_version == json.loads(path.read_text())["schema_version"]
    # the later fields take the defaults that mean what the older format did
    assert plan.kd.signal == "logits" and plan.student.layout.shard_group is None and not plan.extra_students
    for cmd in ("inspect", "simulate"):
        r = run_kdplan(cmd, path, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr)
    r = check_only(path, "--device", "cpu")  # the seed plans are for GPUs; the check is the same
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_the_calibration_loops_1_0_plans_and_reports_are_read():
    """`kdplan calibrate` reads 1.0 reports and the 1.0 plans they ran; the executor accepts those
    plans (CPU plans with data, the tiny example's shape)."""
    dirs = sorted(d for d in LOOP.iterdir() if (d / "measured-report.json").exists())
    assert dirs
    for d in dirs:
        assert json.loads((d / "measured-report.json").read_text())["schema_version"] == "1.0"
        case = load_case(str(d / "measured-report.json"))
        assert case.plan.schema_version == "1.0" and case.measured_step_s > 0
    r = check_only(dirs[0] / "measured-plan.json")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def _from_the_future(path: Path, tmp_path: Path, version: str) -> Path:
    """``path``'s plan as a newer kdplan would write it: another version and a field this one
    does not know."""
    data = json.loads(path.read_text())
    data["schema_version"] = version
    data["kd"]["a_field_of_the_future"] = 1
    out = tmp_path / f"plan-{version}.json"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("version", [NEWER, f"{MAJOR + 1}.0"])
def test_a_newer_or_other_major_plan_is_refused_in_one_line_naming_both_versions(tmp_path, version):
    path = _from_the_future(OLD_PLANS[-1], tmp_path, version)
    r = check_only(path, "--device", "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert version in lines[0] and SCHEMA_VERSION in lines[0] and "executor" in lines[0], lines[0]
    assert "a_field_of_the_future" not in lines[0]  # refused by its version, not by the field it adds
    for cmd in ("inspect", "simulate"):
        r = run_kdplan(cmd, path, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert version in lines[0] and SCHEMA_VERSION in lines[0] and "a_field_of_the_future" not in lines[0]


def test_every_file_kind_applies_the_rule(tmp_path):
    """Reports (kdplan calibrate), jobs and profiles are versioned the same way."""
    report = json.loads((LOOP / "dp2" / "measured-report.json").read_text())
    cluster = (ROOT / "profiles" / "clusters" / "dgx-h100.yaml").read_text()
    assert cluster.startswith('schema_version: "1.0"')
    files = [(RunReport, "report.json", json.dumps(dict(report, schema_version=NEWER))),
             (JobSpec, "job.json", json.dumps({"schema_version": NEWER, "student": "gpt-1.3b"})),
             (ClusterFile, "cluster.yaml", cluster.replace('schema_version: "1.0"', f'schema_version: "{NEWER}"'))]
    for model, name, text in files:
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError) as e:
            load_model(model, tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: ") and NEWER in msg and "newer" in msg and "\n" not in msg, msg
    (tmp_path / "old-job.json").write_text(json.dumps({"schema_version": "1.0", "student": "gpt-1.3b"}))
    assert load_model(JobSpec, tmp_path / "old-job.json").student == "gpt-1.3b"
    (tmp_path / "report.json").write_text(json.dumps(dict(report, schema_version=NEWER)))
    r = run_kdplan("calibrate", tmp_path / "report.json", "--cluster", LOOP / "profile.yaml", timeout=120)
    assert r.returncode == 2 and NEWER in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
