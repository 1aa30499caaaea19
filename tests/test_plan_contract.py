"""The plan is the contract (issue 14): a field the executor cannot honour is refused when the
plan, job or flag is loaded, in one line naming the field, with exit 2 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdplan.schema import JobSpec, KDPlan, Plan
from kdplan.schema.compression import Compression, parse_compression

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu", "job.toml")
MALFORMED = ["topk:abc", "sparse:4", "x|", "topk:", "topk:0"]


def _run(*argv, timeout=120):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _one_line_refusal(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("contract") / "plan.json"
    r = _run("-m", "kdplan.cli.main", "plan", TINY, "-o", out)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_compression_is_typed_and_serialises_to_the_same_string(tiny_plan):
    plan = Plan.model_validate(tiny_plan)
    assert isinstance(plan.kd.compression, Compression)
    assert json.loads(plan.model_dump_json())["kd"]["compression"] == tiny_plan["kd"]["compression"]
    kd = KDPlan(compression="topk:64:int8")
    assert kd.compression == Compression("topk", 64, 8)
    assert kd.model_dump()["compression"] == "topk:64:8"
    assert KDPlan().compression == Compression("dense")


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_compression_strings_are_refused_by_the_parser(bad):
    with pytest.raises(ValueError, match="compression"):
        parse_compression(bad)
    with pytest.raises(ValueError, match="allowed_compressions"):
        JobSpec(kd={"allowed_compressions": ["dense", bad]})


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_compression_is_refused_by_every_loader(tiny_plan, tmp_path, bad):
    data = json.loads(json.dumps(tiny_plan))
    data["kd"]["compression"] = bad
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    for cmd in ("inspect", "simulate"):
        _one_line_refusal(_run("-m", "kdplan.cli.main", cmd, path), "kd.compression", repr(bad))
    _one_line_refusal(_run("-m", "kdplan.cli.main", "plan", TINY, "--fix", f"kd.compression={bad}"),
                      "kd.compression", repr(bad))
    # the executor refuses while loading the plan, before any process group exists
    _one_line_refusal(_run("-m", "executor.launch", path, "--check-only"), "kd.compression", repr(bad))


def test_runs_choose_which_checkpoints_a_launch_may_use(tmp_path, monkeypatch):
    """executor.runs (torch-free): a new invocation gets its own run directory (also when another
    of its ranks already wrote run.json); --resume continues only a matching run; a restart stays
    in its own invocation's directory."""
    from executor import runs

    me = runs.Identity("a" * 64, 3, "d" * 64)
    ck = tmp_path / "checkpoints"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "inv1")
    d, resume = runs.choose(ck, me, resume=False, attempt=0)
    assert (d, resume) == (ck / "inv1", False)
    runs.start(d, me, rank=0)
    (d / "step_00000004").mkdir()
    (d / "step_00000004" / "manifest.json").write_text("{}")
    assert runs.choose(ck, me, resume=False, attempt=0) == (d, False)  # a slower rank of the same invocation
    with pytest.raises(runs.Refused, match="another run"):
        runs.choose(ck, runs.Identity("b" * 64, 3, "d" * 64), resume=False, attempt=0)
    assert runs.choose(ck, me, resume=False, attempt=1) == (d, True)  # a restart: its own directory only
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "inv2")
    assert runs.choose(ck, me, resume=False, attempt=1) == (ck / "inv2", True)  # never inv1's step 4
    assert runs.choose(ck, me, resume=True, attempt=0) == (d, True)
    with pytest.raises(runs.Refused, match=r"seed 3 \(this launch: 4\)"):
        runs.choose(ck, runs.Identity("a" * 64, 4, "d" * 64), resume=True, attempt=0)
    with pytest.raises(runs.Refused, match="no earlier run"):
        runs.choose(tmp_path / "empty", me, resume=True, attempt=0)
