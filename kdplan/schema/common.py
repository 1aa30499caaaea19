"""Shared base for every file that crosses a boundary (profile, job, plan, report).

Strict by design: unknown keys are errors (``extra="forbid"``), units live in field names
(``hbm_gib``, ``bandwidth_gb_per_s``, ``latency_us``, ``step_time_s``) and every field carries a
docstring that ends up in the JSON Schema printed by ``kdplan schema``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = "1.6"
"""Version of the plan / report / job / profile formats. Bump on any incompatible change
(the golden test in tests/test_schema_golden.py fails until you do)."""


class Strict(BaseModel):
    """Base model: unknown keys are errors, docstrings become field descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        protected_namespaces=(),
    )
