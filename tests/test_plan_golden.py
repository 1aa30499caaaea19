"""Plans of the shipped examples are frozen: a refactor that changes a plan fails here.

The golden files hold ``kdplan plan EXAMPLE --json`` with the fields that change run to run
removed (``created_utc``, ``solver.solve_time_s``) and the checkout's path replaced by
``<root>``. A deliberate change of the cost model or the search regenerates them:

    PYTHONPATH=$PWD python tests/test_plan_golden.py --update
"""

import json
import math
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, run_kdplan  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "plans"
EXAMPLES = {"seed": "examples/seed/job.toml", "llama-70b-8b": "examples/llama-70b-8b/job.toml",
            "tiny-cpu": "examples/tiny-cpu/job.toml"}
REL = 1e-9  # floats are compared to this relative tolerance (summation order is not part of the contract)


def normalized(plan_json: str, root: Path) -> dict:
    """The plan without what varies between runs and checkouts."""
    d = json.loads(plan_json.replace(str(root.resolve()), "<root>"))
    d.pop("created_utc")
    d["solver"].pop("solve_time_s")
    return d


def plan_of(name: str) -> dict:
    r = run_kdplan("plan", EXAMPLES[name], "--json")
    assert r.returncode == 0, r.stderr
    return normalized(r.stdout, ROOT)


def differences(got, want, path="") -> list[str]:
    """Paths where ``got`` and ``want`` differ (floats to ``REL``)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: unexpected" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, golden has {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return [] if math.isclose(got, want, rel_tol=REL, abs_tol=0.0) else [f"{path}: {got!r} != golden {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != golden {want!r}"]


def test_differences_sees_a_changed_number_and_a_missing_field():
    want = {"a": 1.0, "b": [1, {"c": "x"}]}
    assert differences({"a": 1.0, "b": [1, {"c": "x"}]}, want) == []
    assert differences({"a": 1.0 + 1e-6, "b": [1, {"c": "x"}]}, want) == [".a: 1.000001 != golden 1.0"]
    assert differences({"a": 1.0, "b": [1, {}]}, want) == [".b[1].c: missing"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_plan_matches_golden(name):
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    diff = differences(plan_of(name), want)
    assert not diff, f"{name} plan changed ({len(diff)} fields; regenerate if deliberate):\n" + "\n".join(diff[:20])


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for n in EXAMPLES:
        (GOLDEN / f"{n}.json").write_text(json.dumps(plan_of(n), indent=1, sort_keys=True) + "\n")
        print("wrote", GOLDEN / f"{n}.json")
