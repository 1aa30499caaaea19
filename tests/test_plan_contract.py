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
