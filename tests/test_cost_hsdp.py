"""Hybrid sharding (HSDP, Layout.shard_group): memory and bytes on the wire by hand.

ZeRO states are sharded over ``shard_group`` dp ranks and replicated across dp / shard_group
groups; ZeRO-3 gathers and reduce-scatters inside the shard group and all-reduces the gradient
shard across the replicas. No torch."""

import pytest
from pydantic import ValidationError

from kdplan.cost.compose import price_student
from kdplan.cost.memory import GIB
from kdplan.models import preset
from kdplan.pins import parse_pins
from kdplan.problem import Problem
from kdplan.profiles import load_cluster
from kdplan.schema.compression import Compression
from kdplan.schema.job import JobSpec
from kdplan.schema.plan import Layout
from kdplan.search.candidates import shard_groups

DENSE = Compression("dense")


def _problem(gpus=16):
    model = preset("gpt-1.3b")
    cluster = load_cluster("dgx-a100-80g", gpus)
    job = JobSpec(teacher=None, student="gpt-1.3b", cluster=cluster.name, gpus=gpus, seq_len=1024, global_batch=64)
    return Problem(job=job, teacher=None, student=model, cluster=cluster), model


def stage_params(model):
    """Parameters one pipeline stage of a single-stage layout holds (role.py _stages): the blocks,
    the input embedding (and learned positions), the output projection unless tied; the final
    norm is not counted."""
    h, V = model.hidden_size, model.vocab_size
    emb = V * h + (model.max_positions * h if model.learned_positions else 0)
    return model.num_layers * model.layer_params() + emb + (0 if model.tied_embeddings else V * h)


def _lay(**kw):
    base = dict(tp=1, pp=1, dp=16, zero=3, micro_batch=2, num_gpus=16)
    return Layout(**{**base, **kw})


def test_states_are_sharded_over_the_shard_group_only():
    problem, model = _problem()
    full = price_student(problem, _lay(), compression=DENSE).memory_terms_gib
    hsdp = price_student(problem, _lay(shard_group=8), compression=DENSE).memory_terms_gib
    P = stage_params(model)
    assert hsdp["weights"] * GIB == pytest.approx(2 * P / 8, rel=1e-9)
    assert hsdp["gradients"] * GIB == pytest.approx(2 * P / 8, rel=1e-9)
    assert hsdp["optimizer"] * GIB == pytest.approx(12 * P / 8, rel=1e-9)
    assert full["optimizer"] * GIB == pytest.approx(12 * P / 16, rel=1e-9)
    # ZeRO-1 over a shard group: only the optimizer state is divided, by the group
    z1 = price_student(problem, _lay(zero=1, shard_group=4), compression=DENSE).memory_terms_gib
    assert z1["optimizer"] * GIB == pytest.approx(12 * P / 4, rel=1e-9)
    assert z1["weights"] * GIB == pytest.approx(2 * P, rel=1e-9)


def test_bytes_on_the_wire_by_hand():
    """Per step over all GPUs, m micro-batches: gathers (forward + backward) inside groups of 8,
    the gradients reduce-scattered inside them and the 1/8 shard all-reduced across 2 replicas."""
    problem, model = _problem()
    lay = _lay(shard_group=8)
    p = price_student(problem, lay, compression=DENSE)
    P, q, m, n = stage_params(model), 2, p.num_micro_batches, 16
    s, r = 8, 2
    assert m == 64 // (16 * 2)
    assert p.bytes_per_step["params"] == pytest.approx(2 * (s - 1) / s * P * q * n * m, rel=1e-9)
    assert p.bytes_per_step["gradients"] == pytest.approx(
        ((s - 1) / s * P * q + 2 * (r - 1) / r * P * q / s) * n * m, rel=1e-9)
    flat = price_student(problem, _lay(), compression=DENSE)
    assert flat.bytes_per_step["params"] == pytest.approx(2 * 15 / 16 * P * q * n * m, rel=1e-9)


def test_hybrid_sharding_keeps_the_gathers_on_nvlink():
    """Two nodes of 8: full sharding gathers every block across the inter-node link; HSDP gathers
    inside the node and only the gradient shard crosses nodes, so less communication is exposed."""
    problem, _ = _problem()
    flat = price_student(problem, _lay(), compression=DENSE)
    hsdp = price_student(problem, _lay(shard_group=8), compression=DENSE)
    assert hsdp.comm_exposed_s.get("params", 0.0) < flat.comm_exposed_s["params"]
    assert hsdp.memory_gib > flat.memory_gib  # the price: states replicated twice


def test_shard_group_must_divide_dp_and_needs_zero():
    with pytest.raises(ValidationError, match="does not divide dp"):
        _lay(shard_group=3)
    with pytest.raises(ValidationError, match="needs zero >= 1"):
        _lay(zero=0, shard_group=8)
    lay = _lay(shard_group=8)
    assert (lay.shard, lay.replicas) == (8, 2)
    assert (_lay().shard, _lay().replicas) == (16, 1)


def test_search_explores_a_node_wide_shard_group_when_dp_spans_nodes():
    assert shard_groups(16, 1, 8) == [None, 8]
    assert shard_groups(16, 2, 8) == [None, 4]
    assert shard_groups(8, 1, 8) == [None]  # one node: nothing to replicate across
    assert shard_groups(16, 1, 8, pinned=4) == [4]  # a pin is priced as given
    assert shard_groups(16, 1, 8, pinned=16) == [None]
    assert shard_groups(16, 1, 8, pinned=3) == []
    assert parse_pins(["student.shard_group=8"]) == {"student.shard_group": 8}


def test_a_pinned_shard_group_reaches_the_plan(kdplan_cli):
    """End to end: the pin reaches the plan (32 GPUs in 4 nodes: groups of 8); one that does not
    divide dp leaves no layout: infeasible, naming the pin (exit 3). The executor's refusal of the field is
    tests/test_exec_contract.py's (FIELDS["student.layout.shard_group"])."""
    import json

    r = kdplan_cli("plan", "examples/seed/job.toml", "--fix", "student.shard_group=8", "--fix", "student.zero=3", "--json")
    assert r.returncode == 0, r.stderr
    lay = json.loads(r.stdout)["student"]["layout"]
    assert (lay["dp"], lay["zero"], lay["shard_group"]) == (32, 3, 8)
    bad = kdplan_cli("plan", "examples/seed/job.toml", "--fix", "student.shard_group=3")
    assert bad.returncode == 3 and "student.shard_group=3" in bad.stderr  # infeasible (design.md)
