"""Every string and enum field of every file kind kdplan reads, set to junk, one at a time.

The random suites (test_fuzz_inputs.py, test_fuzz_artifacts.py) find what a strategy happens to
reach; this one is an enumeration, the same every run: each string-valued field of the job TOML,
the plan JSON, the run report JSON, the cluster YAML and the hardware YAML (found by walking the
file's pydantic JSON schema alongside a valid file, so a field added to a schema is enumerated
without touching this file) is set to each of JUNK, and every reader of that file kind is run.

What each case must do (the contract of tests/fuzzing.py, sharpened per field):
- an enum field (a Literal in the schema) or a formatted one (FORMATTED: compression strings,
  `--fix` values): exit 2, one line that names the field;
- free text (names, paths, descriptions): exit 0, 2 or 3, never 1 or a traceback; when it exits 2,
  the line names the file.
The executor reads plans itself (executor.launch.load_plan, then check(), imported without
starting a process group): an enum or formatted field must be refused (Refused, one line naming
the field); anything the loader accepts must pass check() or be refused by it, never crash.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fuzzing import check, dump, invoke, tiny_llama, write
from kdplan.schema import Plan, RunReport
from kdplan.schema.cluster import ClusterFile, HardwareFile
from kdplan.schema.job import JobSpec
from test_fuzz_artifacts import PLAN, PLAN_READERS, REPORT, executor_reads
from test_fuzz_inputs import HW_BASES, JOB_BASE, SMALL, _cluster_bases, job_dir, profile_copy  # noqa: F401 (a fixture)

JUNK = ["", "sparse:4", "x|", "junk \u202e[/x]"]  # "[/x]": rich markup in a name made inspect exit 1
# Strings with a grammar of their own (not a Literal in the schema): a malformed one is bad input.
FORMATTED = {"compression", "allowed_compressions", "fix"}


def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    return schema


def _branches(schema: dict, defs: dict) -> list[dict]:
    s = _resolve(schema, defs)
    subs = s.get("anyOf") or s.get("oneOf") or s.get("allOf")
    return [b for x in subs for b in _branches(x, defs)] if subs else [s]


def string_fields(schema: dict, value, defs: dict, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """(path, "enum" | "text") of every field of ``value`` (a valid instance of ``schema``) that
    holds a string, or may: optional ones left out or null in ``value`` included."""
    branches = _branches(schema, defs)
    stringy = [b for b in branches if b.get("type") == "string" or "enum" in b or "const" in b]
    if path and stringy and not isinstance(value, (dict, list)):
        yield path, "enum" if all("enum" in b or "const" in b for b in stringy) else "text"
    for b in branches:
        if isinstance(value, dict) and "properties" in b:
            for k, sub in b["properties"].items():
                yield from string_fields(sub, value.get(k), defs, path + (k,))
            return
        if isinstance(value, dict) and isinstance(b.get("additionalProperties"), dict):
            for k, v in value.items():
                yield from string_fields(b["additionalProperties"], v, defs, path + (k,))
            return
        if isinstance(value, list) and isinstance(b.get("items"), dict):
            for i, v in enumerate(value):
                yield from string_fields(b["items"], v, defs, path + (i,))
            return


def cases(model, base: dict) -> list[tuple[tuple, str]]:
    schema = model.model_json_schema()
    found = list(string_fields(schema, base, schema.get("$defs", {})))
    assert found, model
    return found


def leaf(path: tuple) -> str:
    return next(p for p in reversed(path) if isinstance(p, str))


def expect(path: tuple, kind: str) -> str:
    """'refuse' (exit 2 naming the field) or 'any' (never 1; exit 2 names the file)."""
    return "refuse" if kind == "enum" or any(p in FORMATTED for p in path if isinstance(p, str)) else "any"


def with_junk(base: dict, path: tuple, junk: str) -> dict:
    data = json.loads(json.dumps(base))
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = junk
    return data


def ident(path: tuple) -> str:
    return ".".join(map(str, path))


def judge(res, path: tuple, kind: str, filename: str, args) -> None:
    if expect(path, kind) == "refuse":
        assert check(res, names=filename, field=leaf(path), args=args) == 2, \
            f"{ident(path)} (an {kind} field) = junk was not refused: exit {res.exit_code}"
    else:
        check(res, names=(filename, leaf(path)), args=args)


def params(model, base: dict):
    return [pytest.param(path, kind, id=ident(path)) for path, kind in cases(model, base)]


# ---- the plan JSON: kdplan inspect / simulate / run, and the executor's own loader -----------------

@pytest.mark.parametrize("command", sorted(PLAN_READERS))
@pytest.mark.parametrize("path,kind", params(Plan, PLAN))
def test_plan_field_junk(tmp_path, command, path, kind):
    plan = tmp_path / "plan.json"
    args = [command, plan, *PLAN_READERS[command]]
    for junk in JUNK:
        write(plan, dump(with_junk(PLAN, path, junk), ".json"))
        judge(invoke(args), path, kind, "plan.json", args)


@pytest.mark.parametrize("path,kind", params(Plan, PLAN))
def test_executor_plan_field_junk(tmp_path, path, kind):
    plan = tmp_path / "plan.json"
    for junk in JUNK:
        write(plan, dump(with_junk(PLAN, path, junk), ".json"))
        got = executor_reads(plan)
        if expect(path, kind) == "refuse":
            assert got.startswith("refused") and leaf(path) in got, (ident(path), junk, got)


# ---- the run report JSON: the loader and kdplan calibrate --------------------------------------

@pytest.mark.parametrize("path,kind", params(RunReport, REPORT))
def test_report_field_junk(tmp_path, path, kind):
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    report = tmp_path / "report.json"
    args = ["calibrate", report, "--cluster", "cpu-local", "-o", tmp_path / "cal.yaml"]
    for junk in JUNK:
        write(report, dump(with_junk(REPORT, path, junk), ".json"))
        judge(invoke(args, timeout_s=60), path, kind, "report.json", args)


# ---- the job TOML ------------------------------------------------------------------------------

JOB = {**JOB_BASE, "fix": {**JOB_BASE["fix"], "kd.compression": "topk:64", "student.recompute": "full",
                           "kd.placement": "colocated"}}


def test_job_base_with_string_pins_plans(tmp_path):
    """The enumeration's starting point (more pins than the random suite's) is accepted as is."""
    job = job_dir(tmp_path)
    write(job, dump(JOB, ".toml"))
    args = ["plan", job, "-o", tmp_path / "plan.json"]
    assert check(invoke(args), args=args) == 0


@pytest.mark.parametrize("path,kind", params(JobSpec, JOB))
def test_job_field_junk(tmp_path, path, kind):
    job = job_dir(tmp_path)
    args = ["plan", job, "-o", tmp_path / "plan.json"]
    for junk in JUNK:
        write(job, dump(with_junk(JOB, path, junk), ".toml"))
        judge(invoke(args), path, kind, "job.toml", args)


# ---- cluster and hardware YAML -------------------------------------------------------------------

CLUSTERS = _cluster_bases()


@pytest.mark.parametrize("base", sorted(CLUSTERS))
def test_cluster_field_junk(tmp_path, base):
    """One test per base file (cases inside): a cluster file has many fields and one plan each."""
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    path_ = tmp_path / "cluster.yaml"
    gpus = 32 if base == "mixed" else 2  # the mixed cluster splits evenly only over all its GPUs
    args = ["plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", path_, "--gpus", gpus, *SMALL,
            "-o", tmp_path / "plan.json"]
    write(path_, dump(CLUSTERS[base], ".yaml"))
    assert check(invoke(args), args=args) == 0  # the base itself plans
    fields = cases(ClusterFile, CLUSTERS[base])
    assert any(k == "enum" for _, k in fields)
    for path, kind in fields:
        for junk in JUNK:
            write(path_, dump(with_junk(CLUSTERS[base], path, junk), ".yaml"))
            judge(invoke(args), path, kind, "cluster.yaml", args)


@pytest.mark.parametrize("path,kind", params(HardwareFile, HW_BASES["cpu-core"]))
def test_hardware_field_junk(tmp_path, profile_copy, path, kind):
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    args = ["plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", "cpu-local", "--gpus", "2",
            *SMALL, "-o", tmp_path / "plan.json"]
    target = profile_copy / "hardware" / "cpu-core.yaml"
    try:
        for junk in JUNK:
            write(target, dump(with_junk(HW_BASES["cpu-core"], path, junk), ".yaml"))
            judge(invoke(args, env={"KDPLAN_PROFILES": str(profile_copy)}), path, kind, "cpu-core.yaml", args)
    finally:
        write(target, dump(HW_BASES["cpu-core"], ".yaml"))


# ---- the enumeration itself ----------------------------------------------------------------------

def test_enumeration_reaches_the_fields_that_matter():
    """The schema walk finds enum fields as enums, and optional string fields left null."""
    plan = dict(cases(Plan, PLAN))
    assert plan[("kd", "mode")] == "enum" and plan[("student", "layout", "schedule")] == "enum"
    assert plan[("kd", "compression")] == "text" and expect(("kd", "compression"), "text") == "refuse"
    assert plan[("run", "data")] == "text"  # null in the base plan, a string when given
    job = dict(cases(JobSpec, JOB))
    assert job[("kd", "loss")] == "enum" and job[("precision",)] == "enum"
    assert ("kd", "allowed_compressions", 0) in job and ("fix", "kd.compression") in job
    assert dict(cases(HardwareFile, HW_BASES["cpu-core"]))[("gpu", "kind")] == "enum"
