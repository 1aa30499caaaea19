"""The fit's search itself (kdplan/cost/fit.py): the pull of sourced priors.

Fast: a stand-in objective over the values replaces pricing published rows, so each test checks the
search and the penalty, not the cost model (tests/test_validate.py judges the fitted model)."""

import pytest

from kdplan.cost import fit as F


class _Values:
    """A pricer whose 'results' are the values themselves (the objective below reads them)."""

    def results(self, values):
        return dict(values)


def test_the_penalty_pulls_toward_a_sourced_prior_only():
    p = F.Param("passes", "overheads", "eager_elementwise_passes", (), 13.0, 0.0, 200.0, spread=2.0)
    free = F.Param("frag", "overheads", "fragmentation_fraction", (), 0.05, 0.0, 0.6)
    assert F._penalty({"passes": 13.0, "frag": 0.5}, [p, free]) == 0.0  # no spread: a default, no pull
    # one spread away (a factor 2 either way) costs REG_WEIGHT, two spreads four times that
    assert F._penalty({"passes": 26.0, "frag": 0.05}, [p, free]) == pytest.approx(F.REG_WEIGHT)
    assert F._penalty({"passes": 6.5, "frag": 0.05}, [p, free]) == pytest.approx(F.REG_WEIGHT)
    assert F._penalty({"passes": 13 / 4, "frag": 0.05}, [p, free]) == pytest.approx(4 * F.REG_WEIGHT)
    # at its lower bound 0 it is not let off: priced as a thousandth of the prior (about 100 spreads)
    at_zero = F._penalty({"passes": 0.0, "frag": 0.05}, [p, free])
    assert at_zero == pytest.approx(F._penalty({"passes": 0.013, "frag": 0.05}, [p, free])) and at_zero > 90 * F.REG_WEIGHT


def test_a_flat_objective_leaves_a_sourced_prior_where_it_is_and_a_weak_pull_loses_to_the_data(monkeypatch):
    """Rows that cannot see a constant leave it at its counted prior; rows that measure it far away
    win over the pull (the penalty is small against a real error)."""
    p = F.Param("passes", "overheads", "eager_elementwise_passes", (), 13.0, 0.0, 200.0, spread=2.0)
    monkeypatch.setattr(F, "objective", lambda v: 0.0)
    best, values = F._search(_Values(), [p], {"passes": 13.0}, rounds=6)
    assert values["passes"] == 13.0 and best == 0.0
    monkeypatch.setattr(F, "objective", lambda v: abs(v["passes"] / 40.0 - 1.0))  # the rows say 40
    _, values = F._search(_Values(), [p], {"passes": 13.0}, rounds=10)
    assert 30.0 < values["passes"] <= 40.0, values
