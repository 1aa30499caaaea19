"""benchmarks/memory_rows.py --surplus: the least-squares diagnostic of a runtime's memory surplus
(measured - predicted) recovers a planted term and names a row the fitted surplus would put out of
memory (the check that dropped the freed-weight-copies term: FLAG-L3-8B-01 at 82.9 GiB on 80)."""

from __future__ import annotations

import re

import benchmarks.memory_rows as mr


def _row(name, P, Pu, act, tp, meas_extra, limit=80.0):
    pred = 40.0
    return {"row": name, "meas": pred + meas_extra, "pred": pred, "limit": limit, "P": P, "Pu": Pu,
            "act": act, "act_tp1": act if tp == 1 else 0.0, "groups": 2.0, "c": 1.0}


def test_surplus_fit_recovers_bytes_per_parameter_and_flags_out_of_memory():
    # surplus = 2 B per parameter + 2 B per updated parameter, exactly
    specs = [(3.0, 1.0, 10, 2), (1.0, 1.0, 20, 4), (2.0, 0.5, 5, 8), (4.0, 0.1, 8, 1), (0.5, 0.5, 30, 2)]
    feats = [_row(f"R{i}", P, Pu, act, tp, 2 * P + 2 * Pu) for i, (P, Pu, act, tp) in enumerate(specs)]
    feats[3]["limit"] = 40.0 + 2 * 4.0 + 2 * 0.1 - 1.0  # measured above its limit: the fit must say so
    lines = mr.surplus_fits(feats, "test-runtime")
    line = next(x for x in lines if x.strip().startswith("P=") and "c=" not in x and "act" not in x
                and "groups" not in x)
    coef = dict(re.findall(r"(\w+)=([+-][\d.]+)", line))
    assert abs(float(coef["P"]) - 2.0) < 1e-6 and abs(float(coef["Pu"]) - 2.0) < 1e-6
    assert "median |error|  0.0%" in line and "out of memory: R3" in line
    const = next(x for x in lines if x.strip().startswith("c="))
    assert "median |error|  0.0%" not in const  # a constant cannot carry a per-parameter surplus


def test_surplus_needs_rows():
    assert "too few" in mr.surplus_fits([_row("R0", 1, 1, 1, 1, 0)], "x")[0]
