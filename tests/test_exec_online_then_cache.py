"""online_then_cache run by the executor (issue 16): the first epoch runs the teacher online,
co-located, and writes the teacher-output cache as the student trains; later epochs read it.

- the cache written online is the offline pass's cache: the same files (sample hashes under the
  same key directory) with identical bytes;
- the targets, and over 2 gloo processes the losses of 2 epochs, are the online run's and the
  offline run's (same seed and data order; top-k 16 at 8 bits decodes bit for bit the same, so the
  tolerance stated is 1e-6 relative, the one test_exec_epochs.py states for offline vs online);
- a run stopped after k steps of epoch 1 (a half-written file and a torn temporary file left
  behind) and then resumed leaves a complete cache, equal to the offline one; a killed rank
  restarted by `kdplan run --max-restarts` does too, with the uninterrupted run's losses.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from conftest import run_kdplan  # noqa: E402
from exec_helpers import TEACHER, launch, layout, losses, make_plan, make_teacher_checkpoint, read_report, write_plan  # noqa: E402
from test_exec_contract import world_of_one  # noqa: E402,F401 (the fixture: a gloo process group of one)
from test_exec_epochs import _Counting  # noqa: E402 (a teacher runner that counts its sequences)

from kdplan.schema.capability import unsupported, writes_cache_online  # noqa: E402
from kdplan.schema.plan import JobPrediction  # noqa: E402

FMT = "topk:16:8"
ENV = {"OMP_NUM_THREADS": "1", "KDPLAN_NO_PROGRESS": "1"}


def otc_plan(plan, epochs: float = 2.0):
    """``plan`` (co-located online) as the first epoch's plan of an online_then_cache job."""
    job = JobPrediction(strategy="online_then_cache", total_time_s=1.0, teacher_passes=1, dataset_tokens=1.0,
                        tokens_per_student=epochs, epochs=epochs, cache_format=FMT)
    return plan.model_copy(update={"prediction": plan.prediction.model_copy(update={"job": job})})


def _cache_files(directory) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.glob("*.safetensors"))}


# ---- the capability table --------------------------------------------------------------------------

def test_online_then_cache_runs_co_located_online_and_is_refused_otherwise(tmp_path):
    plan = otc_plan(make_plan(tmp_path, layout(), compression=FMT))
    assert writes_cache_online(plan) and unsupported(plan) == []
    assert not writes_cache_online(make_plan(tmp_path, layout(), compression=FMT))
    for field, value in (("mode", "offline"), ("placement", "disaggregated")):
        bad = plan.model_copy(update={"kd": plan.kd.model_copy(update={field: value})})
        found = [u for u in unsupported(bad) if u.feature == "online_then_cache"]
        assert found and found[0].field == f"kd.{field}" and "online_then_cache" in found[0].message


# ---- one process: the Targets ----------------------------------------------------------------------

def _targets(out, plan, rows):
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.teacher import Targets
    from executor.teacher_cache import cache_dir, cache_key
    from executor.train import Data, RunInputs, build_teacher

    tmesh, smesh = build_meshes(plan, 0, "cpu")
    inputs = RunInputs(rows=rows, teacher_checkpoint=plan.run.teacher_checkpoint, student_checkpoint=None,
                       out_dir=out)
    runner = _Counting(build_teacher(plan, tmesh, inputs, torch.device("cpu"), ByteCounter()))
    data = Data(rows, plan)
    key = cache_key(plan, "w1")
    cache = cache_dir(out / "teacher_outputs", key)
    cache.mkdir(parents=True, exist_ok=True)
    t = Targets(plan, tmesh=tmesh, smesh=smesh, runner=runner, microbatch=data.microbatch, n_micro=data.n_micro,
                vocab_size=TEACHER.vocab_size, counter=ByteCounter(), cache_dir=cache, cache_key=key)
    return t, runner, data


def _run(t, data, start, end):
    """The targets of steps [start, end) as training asks for them (teacher phase, then get)."""
    out = []
    for s in range(start, end):
        if t.mode == "online":
            t.teacher_phase(s)
        out += [t.get(s, m) for m in range(data.n_micro)]
        t.done(s)
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.logprobs, y.logprobs)


def test_the_online_epoch_writes_the_offline_cache_and_a_stopped_run_resumes_it(world_of_one, tmp_path):
    """8 samples, global batch 4: 3 epochs of 2 steps. online_then_cache runs the teacher over each
    sample once (steps 0 and 1), writes the 8 files the offline pass writes (identical bytes), and
    gives the offline and the online targets bit for bit. Stopped after step 0 with one of its files
    truncated and a temporary file left behind, the run resumed at step 1 writes what is missing
    (the truncated sample at its first sighting in epoch 2) and ends with the offline cache."""
    ck = make_teacher_checkpoint(tmp_path / "teacher")
    rows = torch.randint(0, TEACHER.vocab_size, (8, 17), generator=torch.Generator().manual_seed(5))
    steps = 6
    online = make_plan(tmp_path, layout(mb=2), compression=FMT, teacher_ckpt=ck, global_batch=4, seq_len=16)
    offline = online.model_copy(update={"kd": online.kd.model_copy(update={"mode": "offline"})})
    plan = otc_plan(online, epochs=3)

    off, off_runner, data = _targets(tmp_path / "off", offline, rows)
    assert off.offline_pass(0, steps, data) == (8, 0)
    reference = _cache_files(off.cache_dir)
    from_offline = _run(off, data, 0, steps)
    from_online = _run(_targets(tmp_path / "on", online, rows)[0], data, 0, steps)

    t, runner, _ = _targets(tmp_path / "otc", plan, rows)
    assert t.cache_dir.name == off.cache_dir.name  # one key: the format, not the strategy
    assert t.plan_cache(0, steps, data) == (8, 0) and t.online_steps == {0, 1}
    got = _run(t, data, 0, steps)
    assert t.finish_cache() == 8 and runner.sequences == 8  # the teacher over each sample once
    assert _cache_files(t.cache_dir) == reference and not list(t.cache_dir.glob(".*"))
    _same(got, from_offline)
    _same(got, from_online)

    # stopped after step 0 of epoch 1, then resumed at step 1
    a, _, _ = _targets(tmp_path / "stop", plan, rows)
    a.plan_cache(0, steps, data)
    _run(a, data, 0, 1)
    assert a.finish_cache() == 4
    first = sorted(a.cache_dir.glob("*.safetensors"))
    assert len(first) == 4
    first[0].write_bytes(first[0].read_bytes()[:-40])  # a file cut short (e.g. by a full disk)
    (a.cache_dir / f".{first[1].stem}.123.deadbeef.tmp").write_bytes(b"torn")  # a write that never finished
    b, runner_b, _ = _targets(tmp_path / "stop", plan, rows)
    assert b.plan_cache(1, steps - 1, data) == (5, 3)
    resumed = _run(b, data, 1, steps)
    assert b.finish_cache() == 5
    assert _cache_files(b.cache_dir) == reference
    assert runner_b.sequences < 3 * 8 and len(b.online_steps) >= 2  # step 1, and the step re-reading first[0]
    _same(resumed, from_offline[data.n_micro:])


# ---- two gloo processes: losses and a killed rank ----------------------------------------------------

EPOCH_ROWS, GLOBAL_BATCH, SEQ_LEN, EPOCHS = 16, 8, 32, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dp = 2 over 2 gloo processes, 16 samples, 2 epochs of 2 steps (checkpoint every step):
    online, offline and online_then_cache runs of the same plan (seed, data order)."""
    tmp = tmp_path_factory.mktemp("otc")
    ck = make_teacher_checkpoint(tmp / "teacher")
    steps = EPOCHS * EPOCH_ROWS // GLOBAL_BATCH
    out = {}
    for mode in ("online", "offline", "otc"):
        plan = make_plan(tmp, layout(dp=2), mode="offline" if mode == "offline" else "online", compression=FMT,
                         teacher_ckpt=ck, global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, checkpoint_every=1)
        plan = plan.model_copy(update={"job": plan.job.model_copy(update={"dataset_tokens": EPOCH_ROWS * SEQ_LEN})})
        if mode == "otc":
            plan = otc_plan(plan, EPOCHS)
        path = write_plan(tmp / f"{mode}.json", plan)
        r = launch(path, 2, "--steps", steps, "--output-dir", tmp / f"out-{mode}", "--report", tmp / f"{mode}.rep")
        assert r.returncode == 0, r.stderr[-4000:]
        out[mode] = (read_report(tmp / f"{mode}.rep"), r.stderr, path)
    return tmp, steps, out


def _cache_of(out_dir):
    dirs = list((out_dir / "plan" / "teacher_outputs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_two_epochs_give_the_online_and_offline_losses_and_the_offline_cache(runs):
    tmp, steps, out = runs
    assert len(losses(out["online"][0])) == steps
    assert losses(out["otc"][0]) == pytest.approx(losses(out["online"][0]), rel=1e-6)
    assert losses(out["otc"][0]) == pytest.approx(losses(out["offline"][0]), rel=1e-6)
    err = out["otc"][1]
    assert re.search(rf"{EPOCH_ROWS} samples to write online over 2 steps, 0 found cached", err), err[-2000:]
    assert re.search(rf"{EPOCH_ROWS} samples written online", err)
    otc, off = _cache_of(tmp / "out-otc"), _cache_of(tmp / "out-offline")
    assert otc.name == off.name and len(_cache_files(off)) == EPOCH_ROWS
    assert _cache_files(otc) == _cache_files(off)
    # the report's cache writes (Measured.cache_write_bytes): the same payloads whoever writes them,
    # within the files' sizes (each file: the payload's tensors plus a header); none online
    written = {m: out[m][0]["measured"]["cache_write_bytes"] for m in out}
    assert written["online"] == 0 and 0 < written["otc"] == written["offline"]
    assert written["offline"] <= sum(len(b) for b in _cache_files(off).values())


def test_a_rank_killed_in_epoch_1_restarts_and_completes_the_cache(runs):
    """Rank 1 killed at step 1 (mid-epoch 1, after the checkpoint of step 1): the restart resumes
    at step 1, writes what epoch 1 still lacks online, and ends with the offline cache and the
    uninterrupted run's losses."""
    tmp, steps, out = runs
    r = run_kdplan("run", out["otc"][2], "--steps", steps, "--max-restarts", 1, "--output-dir", tmp / "otc-kill",
                   "--report", tmp / "otc-kill.rep", "--inject-kill", "1:1", env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = read_report(tmp / "otc-kill.rep")
    assert [(x["rank"], x["resumed_from_step"]) for x in rep["restarts"]] == [(1, 1)]
    assert losses(rep) == pytest.approx(losses(out["otc"][0])[1:], rel=1e-6)
    assert _cache_files(_cache_of(tmp / "otc-kill")) == _cache_files(_cache_of(tmp / "out-offline"))


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    """CacheWriter: a write that fails (here: its directory is gone) is raised by the next flush,
    naming the cache, never lost; files written before it are whole."""
    from executor.kd.compression import encode
    from executor.teacher_cache import CacheWriter, read_sample
    from kdplan.schema.compression import parse_compression

    fmt = parse_compression(FMT)
    payload = encode(torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), fmt, temperature=2.0)
    w = CacheWriter(tmp_path, "k")
    w.put("a", payload)
    w.flush()
    assert w.written == 1
    read_sample(tmp_path, "a", key="k", n=16, vocab_size=64, compression=fmt, temperature=2.0)
    w.directory = tmp_path / "gone"
    w.put("b", payload)
    with pytest.raises(RuntimeError, match="gone: a write failed"):
        w.flush()
    with pytest.raises(RuntimeError, match="a write failed"):
        w.close()
