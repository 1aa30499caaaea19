"""The training step's head-and-loss curves over micro-batch sizes that `kdplan profile` measures on a
CPU (issue 13 item 5): GPUSpec.loss_size_factor (time over the price, by logits size) and
GPUSpec.loss_heap_copies (the host heap the step leaves resident, by teacher-target kind and size),
priced by kdplan.cost (compute.loss_size_factor, loss_heap_bytes, the role's ``loss_heap`` memory
term) and fitted by kdplan.calibrate.profile.fit_head_loss. Synthetic profiles, no torch."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from kdplan.calibrate.profile import fit_head_loss
from kdplan.cost import Candidate, evaluate
from kdplan.cost.compute import (head_elementwise_factor, loss_heap_bytes, loss_passes, loss_size_factor, loss_time,
                                 matmul_time)
from kdplan.jobs import load_job, resolve
from kdplan.problem import Problem
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import GPUSpec
from kdplan.schema.plan import Layout

MIB_ELEMENTS = 2**20 / 4  # fp32 elements in one MiB
JOB = "examples/tiny-cpu/job.toml"


def _gpu(**update) -> GPUSpec:
    return load_cluster("cpu-local").gpu_of_group(0).model_copy(update=update)


def _problem(**gpu_update) -> Problem:
    """The tiny example's problem on cpu-local with its device's fields replaced."""
    p = resolve(load_job(JOB), job_path=JOB)
    cl = p.cluster
    name = cl.groups[0].node.gpu
    gpus = dict(cl.gpus, **{name: cl.gpu_of_group(0).model_copy(update=gpu_update)})
    return dataclasses.replace(p, cluster=cl.model_copy(update={"gpus": gpus}))


def _price(problem: Problem, mb: int):
    cand = Candidate(student=Layout(dp=2, num_gpus=2, micro_batch=mb), teacher=Layout(dp=2, num_gpus=2, micro_batch=mb))
    return evaluate(problem, cand, with_baselines=False)


def test_size_factor_interpolates_in_log_size_and_is_flat_beyond():
    gpu = _gpu(loss_size_factor={8.0: 1.0, 32.0: 2.0})
    assert loss_size_factor(gpu, 8 * MIB_ELEMENTS) == pytest.approx(1.0)
    assert loss_size_factor(gpu, 16 * MIB_ELEMENTS) == pytest.approx(1.5)  # halfway in log2
    assert loss_size_factor(gpu, 2 * MIB_ELEMENTS) == pytest.approx(1.0)
    assert loss_size_factor(gpu, 128 * MIB_ELEMENTS) == pytest.approx(2.0)
    assert loss_size_factor(_gpu(loss_size_factor={}), 32 * MIB_ELEMENTS) == 1.0  # unmeasured


def test_a_measured_cliff_makes_micro_batch_8_slower_than_2():
    """The tiny example: micro-batch 2 has 8 MiB of student logits, 8 has 32 MiB. Flat (no curve)
    the two price within a few percent; with a measured 2x per element at 32 MiB the student's
    head and loss double there, and the step at mb 8 prices slower by that much."""
    flat = _problem(loss_size_factor={})
    cliff = _problem(loss_size_factor={8.0: 1.0, 16.0: 1.0, 32.0: 2.0})
    f2, f8 = _price(flat, 2), _price(flat, 8)
    c2, c8 = _price(cliff, 2), _price(cliff, 8)
    assert c2.step_time_s == pytest.approx(f2.step_time_s, rel=1e-9)  # 8 MiB: factor 1
    assert c8.step_time_s > c2.step_time_s > 0
    # the extra is the student's head and loss priced once more (factor 2 - 1), per micro-batch
    s = cliff.student
    gpu = flat.cluster.gpu_of_group(0)
    tokens = 8 * flat.job.seq_len
    per_mb = (loss_time(gpu, tokens * s.vocab_size, loss_passes(train=True, kd="dense", gpu=gpu, vocab=s.vocab_size),
                        flat.cluster.overheads.loss_bytes_per_s_fraction)
              + 3 * matmul_time(gpu, "fp32", tokens, s.vocab_size, s.hidden_size) * head_elementwise_factor(gpu))
    assert per_mb > 0
    assert c8.step_time_s - f8.step_time_s > 0.5 * per_mb  # at least half of it on the critical path


def test_heap_curve_per_kind_follows_the_dense_shape_and_gpus_ignore_it():
    heap = {"dense": {8.0: 18.0, 32.0: 20.0}, "sample": {8.0: 9.0}}
    cpu = _gpu(loss_heap_copies=heap)
    e8, e32 = 8 * MIB_ELEMENTS, 32 * MIB_ELEMENTS
    assert loss_heap_bytes(cpu, e8, "dense") == pytest.approx(18.0 * 8 * 2**20)
    assert loss_heap_bytes(cpu, e32, "dense") == pytest.approx(20.0 * 32 * 2**20)
    assert loss_heap_bytes(cpu, e32, "sample") == pytest.approx(9.0 / 18.0 * 20.0 * 32 * 2**20)
    assert loss_heap_bytes(cpu, e32, "topk") == 0.0  # not measured: no term
    assert loss_heap_bytes(cpu, e32, None) == 0.0  # plain CE ("none") not measured either
    gpu = cpu.model_copy(update={"kind": "gpu"})
    assert loss_heap_bytes(gpu, e32, "dense") == 0.0


def test_loss_heap_is_a_memory_term_beyond_the_counted_logits_without_fragmentation():
    plain = _problem(loss_heap_copies={})
    heap = _problem(loss_heap_copies={"dense": {4.0: 18.0, 32.0: 18.0}})
    a, b = _price(plain, 2).memory.terms_gib, _price(heap, 2).memory.terms_gib
    assert "loss_heap" not in a
    # micro-batch 2 of 128 tokens: 8 MiB per fp32 copy; 18 copies less the logits and KD buffers counted
    assert b["loss_heap"] == pytest.approx(18 * 8 / 1024 - b["logits"] - b["kd_buffers"], rel=1e-6)
    assert b["fragmentation"] == pytest.approx(a["fragmentation"], rel=1e-9)  # a high-water mark: not fragmented again
    assert _price(heap, 2).memory_per_gpu_gib == pytest.approx(_price(plain, 2).memory_per_gpu_gib + b["loss_heap"], rel=1e-6)
    # the teacher (forward only) gets no such term; a kind not measured neither
    assert not any(k.startswith("teacher_loss_heap") for k in b)
    topk = _problem(loss_heap_copies={"dense": {4.0: 18.0, 32.0: 18.0}, "topk": {8.0: 12.0}})
    assert "loss_heap" in _price(topk, 2).memory.terms_gib


def test_fit_recovers_a_synthetic_curve_normalised_at_the_reference():
    gpu = _gpu(loss_size_factor={}, loss_heap_copies={})
    frac, V, h = 0.7, 8192, 128
    truth = {128: 0.9, 256: 1.0, 512: 1.3, 1024: 2.6}

    def priced(t):
        return (3 * matmul_time(gpu, "fp32", t, V, h) * head_elementwise_factor(gpu)
                + loss_time(gpu, t * V, loss_passes(train=True, kd="dense", gpu=gpu, vocab=V), frac))
    scale = 1.7  # an overall scale the other terms carry: normalised away
    samples = [{"tokens": t, "hidden": h, "vocab": V, "elements": t * V, "kind": "dense", "time_s": scale * f * priced(t),
                "heap_bytes": c * 4 * t * V} for (t, f), c in zip(truth.items(), (18.0, 18.0, 19.0, 21.0))]
    samples.append({"tokens": 256, "hidden": h, "vocab": V, "elements": 256 * V, "kind": "sample", "time_s": 1.0,
                    "heap_bytes": 10.0 * 4 * 256 * V})
    out = fit_head_loss(samples, gpu, frac, ref_elements=2**21)  # 8 MiB: the 256-token sample
    assert out.loss_size_factor == pytest.approx({4.0: 0.9, 8.0: 1.0, 16.0: 1.3, 32.0: 2.6}, rel=1e-3)
    assert out.loss_heap_copies == {"dense": {4.0: 18.0, 8.0: 18.0, 16.0: 19.0, 32.0: 21.0}, "sample": {8.0: 10.0}}
    assert "time over price, 1 at 8 MiB" in out.source and "sample: 8 MiB 10" in out.source
    # no heap measured (a GPU): no heap curve
    gpu_out = fit_head_loss([dict(x, heap_bytes=None) for x in samples], gpu.model_copy(update={"kind": "gpu"}), frac)
    assert gpu_out.loss_heap_copies == {} and gpu_out.loss_size_factor[4.0] == pytest.approx(1.0)


def test_schema_refuses_bad_curves():
    base = _gpu().model_dump()
    with pytest.raises(ValidationError, match="loss_heap_copies"):
        GPUSpec.model_validate(dict(base, loss_heap_copies={"softmax": {8.0: 1.0}}))
    with pytest.raises(ValidationError, match="loss_size_factor"):
        GPUSpec.model_validate(dict(base, loss_size_factor={8.0: 0.0}))
    with pytest.raises(ValidationError, match="out of range"):
        GPUSpec.model_validate(dict(base, loss_heap_copies={"dense": {-1.0: 3.0}}))
    ok = GPUSpec.model_validate(dict(base, loss_size_factor={8.0: 1.0}, loss_heap_copies={"dense": {8.0: 18.0}}))
    assert GPUSpec.model_validate(ok.model_dump(mode="json")) == ok  # round-trips through JSON / YAML keys
