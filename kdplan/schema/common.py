"""Shared base for every file that crosses a boundary (profile, job, plan, report).

Strict by design: unknown keys are errors (``extra="forbid"``), units live in field names
(``hbm_gib``, ``bandwidth_gb_per_s``, ``latency_us``, ``step_time_s``) and every field carries a
docstring that ends up in the JSON Schema printed by ``kdplan schema``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = "1.12"
"""Version of the plan / report / job / profile formats, MAJOR.MINOR. A minor bump only adds
fields, each with a default that means what the older format did, so a file of any earlier minor
of the same major loads as it is (tests/test_schema_versions.py checks every minor against the
golden plan schemas of git history); a major bump marks a change that is not additive. Bump on
any change (the golden test in tests/test_schema_golden.py fails until you do)."""


def _parse_version(v: str) -> tuple[int, int] | None:
    parts = v.split(".") if isinstance(v, str) else []
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def schema_version_error(found: object, *, kind: str = "plan", reader: str = "kdplan") -> str | None:
    """Why a ``kind`` file of format version ``found`` cannot be read by this code, in one line
    naming both versions; None when it can: the same major and a minor up to SCHEMA_VERSION's
    (older minors only lack fields that have defaults). The one rule every reader applies: the
    pydantic models below (``Versioned``) and the executor's plan loader."""
    major, minor = _parse_version(SCHEMA_VERSION)
    readable = f"{major}.0 to {SCHEMA_VERSION}"
    got = _parse_version(found) if isinstance(found, str) else None
    if got is None:
        shown = repr(found) if len(repr(found)) <= 40 else repr(found)[:37] + "..."
        return (f"{kind} schema_version {shown} is not a MAJOR.MINOR schema version; this {reader} (schema"
                f" {SCHEMA_VERSION}) reads {readable}")
    if got[0] != major:
        return (f"{kind} schema_version {found}: another major schema version than this {reader}'s {SCHEMA_VERSION}"
                f" (it reads {readable}): use the kdplan that wrote it, or write the file again with this one")
    if got[1] > minor:
        return (f"{kind} schema_version {found}: a newer schema version than this {reader}'s {SCHEMA_VERSION} (it"
                f" reads {readable}): upgrade kdplan here, or write the file again with this one")
    return None


class Strict(BaseModel):
    """Base model: unknown keys are errors, docstrings become field descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        protected_namespaces=(),
    )


class Versioned(Strict):
    """Base of a top-level file (plan, report, job, profile): its ``schema_version`` is checked
    before any field (``schema_version_error``), so a newer file is refused by its version, not
    by the first field this code does not know. A file without one is read as this version."""

    file_kind: ClassVar[str] = "file"

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema_version" in data:
            if why := schema_version_error(data["schema_version"], kind=cls.file_kind):
                raise PydanticCustomError("schema_version", why)
        return data
