"""The plan schema is frozen by a golden file: a change must be deliberate and bump the version.

To accept a deliberate change: bump SCHEMA_VERSION in kdplan/schema/common.py, then run
    KDPLAN_UPDATE_GOLDEN=1 pytest tests/test_schema_golden.py
"""

import json
import os
from pathlib import Path

from kdplan.cli.schema import json_schema
from kdplan.schema import SCHEMA_VERSION

GOLDEN = Path(__file__).parent / "golden" / "plan_schema.json"


def test_plan_schema_matches_golden():
    current = {"schema_version": SCHEMA_VERSION, "schema": json_schema("plan")}
    if os.environ.get("KDPLAN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["schema"] != current["schema"]:
        assert golden["schema_version"] != SCHEMA_VERSION, (
            "the plan schema changed but SCHEMA_VERSION did not: bump it and regenerate the golden "
            "file (see this test's docstring)")
        raise AssertionError("plan schema changed: regenerate the golden file with KDPLAN_UPDATE_GOLDEN=1")


def test_schema_command_prints_every_schema(kdplan_cli):
    for kind in ("plan", "job", "report", "cluster"):
        r = kdplan_cli("schema", kind)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["type"] == "object" and data["properties"]
    plan = json.loads(kdplan_cli("schema", "plan").stdout)
    for key in ("schema_version", "teacher", "student", "kd", "prediction", "solver"):
        assert key in plan["properties"], key
