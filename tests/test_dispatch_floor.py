"""The host-dispatch floor of a block (ComputeEfficiency.op_dispatch_us, compute.block_ops): a
block's forward and backward take at least the host's time to issue their operators. It binds on
small blocks at small micro-batches (KD students; the H200's gpt-1.3b block at micro-batch 1,
kdplan/data/h200_block_times.json) and leaves large ones alone."""

import dataclasses

import pytest

from kdplan.cost import fit as F
from kdplan.cost.compute import block_ops, dispatch_floor_s, layer_time
from kdplan.models import load_model_spec
from kdplan.profiles import load_hardware

S = 2048


def _gpu(us: float):
    """The H200 with a fixed GEMM curve (kdplan profile's on a real H200: 0.72 of peak, half of it
    at 3 GFLOP), so that these checks do not move when the shipped curve is refitted."""
    g = load_hardware("h200")
    eff = g.efficiency.model_copy(update={"op_dispatch_us": us, "max_fraction": 0.72, "half_saturation_gflop": 3.0})
    return g.model_copy(update={"efficiency": eff})


def _block_s(model: str, b: int, us: float) -> float:
    lt = layer_time(load_model_spec(model), _gpu(us), "bf16", b=b, s=S, tp=1)
    return lt.forward_s + lt.backward_s


def test_the_floor_slows_small_blocks_and_leaves_large_ones():
    """At 15 us per operator the 170 operators of a gpt-1.3b block (2.6 ms) outlast its device work
    at micro-batch 1 (~1.3 ms), not a gpt-13b block's at micro-batch 8."""
    small0, small = _block_s("gpt-1.3b", 1, 0.0), _block_s("gpt-1.3b", 1, 15.0)
    large0, large = _block_s("gpt-13b", 8, 0.0), _block_s("gpt-13b", 8, 15.0)
    assert small == pytest.approx(sum(block_ops(load_model_spec("gpt-1.3b"))) * 15e-6)
    assert small > 1.5 * small0
    assert large == large0


def test_each_pass_takes_the_longer_of_device_work_and_dispatch():
    model = load_model_spec("llama-3-8b")
    gpu = _gpu(30.0)
    lt = layer_time(model, gpu, "bf16", b=1, s=S, tp=1)
    f_ops, b_ops = block_ops(model)
    assert (f_ops, b_ops) == (77, 139)  # rmsnorm + gated MLP (gpt: 56 / 114)
    assert (lt.forward_floor_s, lt.backward_floor_s) == pytest.approx((f_ops * 30e-6, b_ops * 30e-6))
    assert lt.forward_s == max(lt.device_forward_s, lt.forward_floor_s)
    assert lt.backward_s == max(2 * lt.device_forward_s, lt.backward_floor_s)
    assert dispatch_floor_s(model, _gpu(0.0)) == (0.0, 0.0)


def test_a_training_role_pays_the_floor_in_its_backward():
    """price_student: a small student at micro-batch 1 on H100s slows down when the floor grows;
    its backward is priced as the blocks' backward (not twice a floored forward)."""
    from kdplan.cost import price_student
    from kdplan.jobs import resolve
    from kdplan.schema.compression import Compression
    from kdplan.schema.job import JobSpec
    from kdplan.schema.plan import Layout

    def price(us: float) -> float:
        p = resolve(JobSpec(teacher="gpt-13b", student="gpt-1.3b", cluster="dgx-h100", gpus=8, global_batch=64))
        cl = p.cluster
        gpus = {n: g.model_copy(update={"efficiency": g.efficiency.model_copy(update={"op_dispatch_us": us})})
                for n, g in cl.gpus.items()}
        p = dataclasses.replace(p, cluster=cl.model_copy(update={"gpus": gpus}))
        lay = Layout(tp=1, pp=1, dp=8, micro_batch=1, num_gpus=8)
        return price_student(p, lay, compression=Compression("dense")).time_s

    assert price(100.0) > 1.5 * price(0.0)


def test_the_fit_recovers_a_dispatch_time_it_generated():
    """Blocks whose 'measurement' is the model's own prediction at 25 us per operator: fitting
    h100.op_dispatch_us alone (from its 10 us prior, without its pull: tests/test_fit_search.py) finds 25."""
    param = dataclasses.replace(next(p for p in F.PARAMS if p.name == "h100.op_dispatch_us"), spread=0.0)
    truth = {param.name: 25.0}
    synthetic = [dataclasses.replace(c, measured_time_s=F.price_block(F.apply(c, truth, (param,))).predicted_time_s)
                 for c in F.block_cases()]
    assert F.fit(synthetic, (param,), rounds=12).values[param.name] == pytest.approx(25.0, rel=0.03)


def test_the_counts_are_the_executors_blocks():
    """block_ops is what executor.models builds: every aten call of a one-block forward (with
    autograd) and its backward, counted with a TorchDispatchMode on tiny CPU blocks of each norm
    and MLP kind. Fails when the modeling code (transformers) changes a count by more than 3% (the
    gated MLP's +5 / +9 is an average over two blocks; grouped-query attention adds an operator or
    two to the backward)."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    from executor.models import build_model

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    for name in ("gpt-1.3b", "llama-3-8b"):
        for gated in (False, True):
            spec = load_model_spec(name).model_copy(update=dict(
                hidden_size=64, num_heads=4, num_kv_heads=4 if name == "gpt-1.3b" else 2, ffn_hidden_size=128,
                num_layers=1, vocab_size=64, tied_embeddings=False, gated_mlp=gated))
            layer, rope = (lambda m: (m.model.layers[0], m.model.rotary_emb))(build_model(spec, device="cpu",
                                                                                        dtype=torch.bfloat16))
            x = torch.randn(1, 16, 64, dtype=torch.bfloat16, requires_grad=True)
            pos = torch.arange(16).unsqueeze(0)
            pe = rope(x, pos)
            dy = torch.randn(1, 16, 64, dtype=torch.bfloat16)
            with Count() as fwd:
                y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
                y = y[0] if isinstance(y, tuple) else y
            with Count() as bwd:
                y.backward(dy)
            want = block_ops(spec)
            assert fwd.n == pytest.approx(want[0], rel=0.03) and bwd.n == pytest.approx(want[1], rel=0.03), (
                name, gated, (fwd.n, bwd.n), want)


def test_the_floor_keeps_its_prior_without_the_rows_that_see_it():
    """Param.sources: fitted on the published H100 rows alone (fused blocks, other operators), the
    dispatch time is not moved from its prior; with the blocks it is."""
    from kdplan.cost.validate import EXTRA_CSV, build_case, read_rows

    param = next(p for p in F.PARAMS if p.name == "h100.op_dispatch_us")
    olmo = [build_case(r) for r in read_rows(EXTRA_CSV) if r["source_id"] == "olmo_core_readme"]
    assert any(param.acts_on(c) for c in olmo)  # in scope: H100 rows
    without = F.fit(olmo, (param,), rounds=2)
    assert param.name in without.untouched and without.values[param.name] == param.prior
    truth = {param.name: 25.0}
    blocks = [dataclasses.replace(c, measured_time_s=F.price_block(F.apply(c, truth, (param,))).predicted_time_s)
              for c in F.block_cases()]
    assert param.name not in F.fit(olmo + blocks, (param,), rounds=2).untouched
