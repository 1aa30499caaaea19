"""The search's Pricer protocol (kdplan.search.space.Pricer) is what kdplan.cost provides: every
method exists there with the same parameters, so a renamed or re-ordered cost-model argument
fails here instead of deep in a search."""

import inspect

import pytest

from kdplan import cost
from kdplan.search.space import Pricer

METHODS = [n for n, f in vars(Pricer).items() if inspect.isfunction(f) and not n.startswith("_")]


def test_protocol_lists_what_the_search_calls():
    assert sorted(METHODS) == ["compose", "evaluate", "price_student", "price_teacher", "price_transfer"]


@pytest.mark.parametrize("name", METHODS)
def test_cost_model_matches_the_protocol(name):
    want = [(p.name, p.kind, p.default is inspect.Parameter.empty)
            for p in inspect.signature(getattr(Pricer, name)).parameters.values() if p.name != "self"]
    got = [(p.name, p.kind, p.default is inspect.Parameter.empty)
           for p in inspect.signature(getattr(cost, name)).parameters.values()]
    assert got == want
