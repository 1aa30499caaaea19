"""One name, one meaning (issue 14): ``recompute`` means in the executor what the cost model prices
(kdplan.cost.memory / role): selective recomputes the attention core only, full the whole block."""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from executor.models import build_model, materialize  # noqa: E402
from executor.parallelize import apply_ac  # noqa: E402
from exec_helpers import STUDENT  # noqa: E402


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.n["attention" if "scaled_dot_product" in name and "backward" not in name else name] += 1
        return func(*args, **(kwargs or {}))


def _step(recompute: str):
    model = build_model(STUDENT)
    apply_ac(model, recompute)
    model = materialize(model, seed=0)
    ids = torch.randint(0, STUDENT.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with _Ops() as ops:
        model(ids).logits.float().pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return ops.n, grads


def test_selective_recomputes_the_attention_core_and_nothing_else():
    none, g_none = _step("none")
    sel, g_sel = _step("selective")
    full, g_full = _step("full")
    layers = STUDENT.num_layers
    assert none["attention"] == layers
    assert sel["attention"] == 2 * layers  # the attention core runs again in backward
    assert sel["mm"] == none["mm"]  # the projections and the MLP are kept, not recomputed
    assert full["attention"] == 2 * layers and full["mm"] > none["mm"]  # full recomputes the block
    for k, g in g_none.items():  # recomputation changes memory and time, never the gradients
        torch.testing.assert_close(g_sel[k], g, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(g_full[k], g, rtol=1e-5, atol=1e-6, msg=k)
