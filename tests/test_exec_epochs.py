"""Epochs over a fixed dataset and the offline teacher-output cache (issue 16, executor side).

- the dataset (plan job.dataset_tokens) is the first D rows, whole global batches, and every
  epoch visits each row once;
- the cache is keyed by content (sample tokens, teacher weights, format, temperature): a rerun
  reuses it, another teacher or format does not, a damaged file is named and rewritten (never
  used: the pass checks headers and lengths, every read the sha256), concurrent writers leave
  one whole file;
- offline over 3 epochs runs the teacher over each sample once (online: every epoch) and gives
  the online run's losses (2 gloo processes), also when restarted on the cache.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil

import pytest

torch = pytest.importorskip("torch")

from exec_helpers import TEACHER, launch, layout, losses, make_plan, make_teacher_checkpoint, read_report, write_plan  # noqa: E402
from test_exec_contract import world_of_one  # noqa: E402,F401 (the fixture: a gloo process group of one)


# ---- the dataset ------------------------------------------------------------------------------------

def test_dataset_is_whole_global_batches_and_each_epoch_visits_every_row_once():
    from executor.data import Batches, dataset_rows

    rows = torch.arange(100 * 5).reshape(100, 5)
    d = dataset_rows(rows, 22 * 4, seq_len=4, global_batch=8)  # 22 sequences -> 16, two global batches
    assert torch.equal(d, rows[:16])
    assert dataset_rows(rows, None, seq_len=4, global_batch=8) is rows
    b = Batches(d, global_batch=8, seed=3)
    epochs = [torch.cat([b.global_indices(s) for s in range(2 * e, 2 * e + 2)]) for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(16))
    assert not torch.equal(epochs[0], epochs[1])  # each epoch in its own order
    with pytest.raises(ValueError, match="holds 100"):
        dataset_rows(rows, 200 * 4, seq_len=4, global_batch=8)
    with pytest.raises(ValueError, match="less than one global batch"):
        dataset_rows(rows, 7 * 4, seq_len=4, global_batch=8)


# ---- the cache's key ------------------------------------------------------------------------------

def test_cache_key_names_teacher_weights_format_and_temperature(tmp_path):
    from executor.teacher_cache import cache_key, weights_sha256

    a = make_teacher_checkpoint(tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")  # same weights elsewhere (another path, another mtime)
    assert weights_sha256(a) == weights_sha256(tmp_path / "copy")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one weight bit
    f.write_bytes(bytes(data))
    assert weights_sha256(b) != weights_sha256(a)
    memo = tmp_path / "memo"
    assert weights_sha256(b, memo_dir=memo) == weights_sha256(b, memo_dir=memo) == weights_sha256(b)
    assert len(list(memo.iterdir())) == 1
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))  # changed back: a new mtime, so the memo is not reused
    assert weights_sha256(b, memo_dir=memo) == weights_sha256(a)

    plan = make_plan(tmp_path, layout(), mode="offline", compression="topk:16:8")
    key = cache_key(plan, "w1")
    assert key == cache_key(plan.model_copy(deep=True), "w1")
    kd = lambda **u: plan.model_copy(update={"kd": plan.kd.model_copy(update=u)})  # noqa: E731
    others = [cache_key(plan, "w2"), cache_key(kd(compression="topk:8:8"), "w1"), cache_key(kd(temperature=1.0), "w1"),
              cache_key(plan.model_copy(update={"job": plan.job.model_copy(update={"precision": "bf16"})}), "w1")]
    assert len({key, *others}) == 5


# ---- the offline pass, in one process ----------------------------------------------------------------

class _Counting:
    """A TeacherRunner stand-in around the real one: counts the sequences it runs."""

    def __init__(self, runner):
        self.runner, self.sequences = runner, 0
        self.device = runner.device

    def logits(self, ids):
        self.sequences += ids.shape[0]
        return self.runner.logits(ids)


def _targets(tmp_path, plan, rows, teacher_key="w1"):
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.teacher import Targets
    from executor.teacher_cache import cache_dir, cache_key
    from executor.train import Data, RunInputs, build_teacher

    tmesh, smesh = build_meshes(plan, 0, "cpu")
    inputs = RunInputs(rows=rows, teacher_checkpoint=plan.run.teacher_checkpoint, student_checkpoint=None,
                       out_dir=tmp_path)
    runner = _Counting(build_teacher(plan, tmesh, inputs, torch.device("cpu"), ByteCounter()))
    data = Data(rows, plan)
    key = cache_key(plan, teacher_key) if plan.kd.mode == "offline" else ""
    cache = cache_dir(tmp_path / "teacher_outputs", key)
    cache.mkdir(parents=True, exist_ok=True)
    t = Targets(plan, tmesh=tmesh, smesh=smesh, runner=runner, microbatch=data.microbatch, n_micro=data.n_micro,
                vocab_size=TEACHER.vocab_size, counter=ByteCounter(), cache_dir=cache, cache_key=key)
    return t, runner, data


def _all_targets(t, data, steps):
    out = []
    for s in range(steps):
        if t.mode == "online":
            t.teacher_phase(s)
        out += [t.get(s, m) for m in range(data.n_micro)]
        t.done(s)
    return out


def test_offline_writes_each_sample_once_reruns_reuse_and_damage_is_rewritten(world_of_one, tmp_path, capfd):
    from executor.teacher_cache import CacheDamaged, path_of, read_sample

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    rows = torch.randint(0, TEACHER.vocab_size, (8, 17), generator=torch.Generator().manual_seed(5))
    steps = 6  # 3 epochs of 2 steps (global batch 4 of 8 rows)
    plan = make_plan(tmp_path, layout(mb=2), mode="offline", compression="topk:16:8", teacher_ckpt=ck,
                     global_batch=4, seq_len=16)
    online = plan.model_copy(update={"kd": plan.kd.model_copy(update={"mode": "online"})})

    t, runner, data = _targets(tmp_path, plan, rows)
    assert t.offline_pass(0, steps, data) == (8, 0)
    assert runner.sequences == 8  # the teacher ran over each sample once, not once per epoch
    files = sorted(t.cache_dir.glob("*.safetensors"))
    assert len(files) == 8 and not list(t.cache_dir.glob(".*"))  # no temporary file left behind
    cached = _all_targets(t, data, steps)

    on, on_runner, _ = _targets(tmp_path / "online", online, rows)
    fresh = _all_targets(on, data, steps)
    assert on_runner.sequences == 3 * 8  # online: the teacher every epoch
    for a, b in zip(cached, fresh):  # the same top-k payloads, decoded: bit for bit
        assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)

    again, runner2, _ = _targets(tmp_path, plan, rows)  # a restart or a new run: the cache is reused
    assert again.offline_pass(2, steps - 2, data) == (0, 8) and runner2.sequences == 0
    other, runner3, _ = _targets(tmp_path, plan, rows, teacher_key="w2")  # another teacher: its own files
    assert other.cache_dir != t.cache_dir and other.offline_pass(0, steps, data) == (8, 0) and runner3.sequences == 8
    fmt = plan.model_copy(update={"kd": plan.kd.model_copy(update={"compression": "topk:8:8"})})
    assert _targets(tmp_path, fmt, rows)[0].cache_dir not in (t.cache_dir, other.cache_dir)

    # damage the pass sees (it reads headers only): a truncated file, another key's file in its place
    flipped, cut, foreign = files[0], files[1], files[2]
    cut.write_bytes(cut.read_bytes()[:-40])
    shutil.copy(other.cache_dir / foreign.name, foreign)
    with pytest.raises(CacheDamaged, match="unreadable"):  # nor would a read use either
        read_sample(t.cache_dir, cut.stem, **t._cache_args())
    with pytest.raises(CacheDamaged, match="another teacher"):
        read_sample(t.cache_dir, foreign.stem, **t._cache_args())
    capfd.readouterr()
    fixed, runner4, _ = _targets(tmp_path, plan, rows)
    assert fixed.offline_pass(0, steps, data) == (2, 6)
    err = capfd.readouterr().err
    assert cut.name in err and "header says" in err and foreign.name in err and err.count("rewriting it") == 2
    assert runner4.sequences in (2, 4)  # only the micro-batches holding them
    # a flipped bit in the data passes the pass's check, never a read: the reader removes the
    # file and stops, and the next pass rewrites it
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    assert _targets(tmp_path, plan, rows)[0].offline_pass(0, steps, data) == (0, 8)
    step, m = _where(data, steps, flipped.stem)
    again.store.clear()
    with pytest.raises(CacheDamaged, match="sha256; removed it"):
        again.get(step, m)
    assert not flipped.exists()
    healed, _, _ = _targets(tmp_path, plan, rows)
    assert healed.offline_pass(0, steps, data) == (1, 7)
    assert all(path_of(t.cache_dir, f.stem).exists() for f in files)
    for a, b in zip(_all_targets(healed, data, steps), cached):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)


def _where(data, steps, sample):
    for s in range(steps):
        for m in range(data.n_micro):
            if sample in data.microbatch(s, 0, m)[2]:
                return s, m
    raise AssertionError(sample)


# ---- concurrent writers ----------------------------------------------------------------------------

def _writer(directory, sample, key, seed, n):
    from executor.kd.compression import encode
    from executor.teacher_cache import write_sample
    from kdplan.schema.compression import parse_compression

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = torch.randn(16, 64, generator=g)
        write_sample(directory, sample, encode(logits, parse_compression("topk:8:8"), temperature=2.0), key)


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    """Three processes rewrite one sample 30 times each while this one reads it: every read finds
    a whole file (no torn or interleaved write), and no temporary file is left."""
    from executor.teacher_cache import CacheDamaged, read_sample
    from kdplan.schema.compression import parse_compression

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, "s", "k", i, 30)) for i in range(3)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        try:
            read_sample(tmp_path, "s", key="k", n=16, vocab_size=64, compression=parse_compression("topk:8:8"),
                        temperature=2.0)
            reads += 1
        except CacheDamaged as e:
            assert "missing" in str(e), e  # before the first rename only
    for p in procs:
        p.join()
        assert p.exitcode == 0
    read_sample(tmp_path, "s", key="k", n=16, vocab_size=64, compression=parse_compression("topk:8:8"),
                temperature=2.0)
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]
    assert reads > 0


# ---- 3 epochs, 2 processes: offline gives the online losses ------------------------------------------

EPOCH_ROWS, GLOBAL_BATCH, SEQ_LEN = 16, 8, 32


def test_three_offline_epochs_match_three_online_epochs_and_a_restart_reads_the_cache(tmp_path):
    """Data parallel over 2 gloo processes, 16 samples (job.dataset_tokens), 3 epochs of 2 steps,
    top-k 16 at 8 bits: the offline run (teacher once, then the cache) gives the online run's
    losses (the teacher every epoch) to 1e-6 relative (measured: equal), and a rerun in the same
    output directory (a new run directory) finds all 16 samples cached and repeats them exactly."""
    ck = make_teacher_checkpoint(tmp_path / "teacher")
    steps = 3 * EPOCH_ROWS // GLOBAL_BATCH
    runs = {}
    for mode in ("online", "offline", "offline-again"):
        plan = make_plan(tmp_path, layout(dp=2), mode=mode.split("-")[0], compression="topk:16:8", teacher_ckpt=ck,
                         global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN)
        plan = plan.model_copy(update={"job": plan.job.model_copy(update={"dataset_tokens": EPOCH_ROWS * SEQ_LEN})})
        path = write_plan(tmp_path / f"{mode}.json", plan)
        out = tmp_path / ("out-offline" if mode.startswith("offline") else "out-online")
        r = launch(path, 2, "--steps", steps, "--output-dir", out, "--report", tmp_path / f"{mode}.json.report")
        assert r.returncode == 0, r.stderr[-4000:]
        runs[mode] = (read_report(tmp_path / f"{mode}.json.report"), r.stderr)
    assert len(losses(runs["online"][0])) == steps
    assert losses(runs["offline"][0]) == pytest.approx(losses(runs["online"][0]), rel=1e-6)
    assert losses(runs["offline-again"][0]) == losses(runs["offline"][0])
    said = lambda err: re.search(r"(\d+) samples written, (\d+) found cached", err).groups()  # noqa: E731
    assert said(runs["offline"][1]) == (str(EPOCH_ROWS), "0")
    assert said(runs["offline-again"][1]) == ("0", str(EPOCH_ROWS))
    assert runs["offline"][0]["measured"]["bytes_per_step"]["teacher_outputs_disk"] > 0
    assert len(list((tmp_path / "out-offline" / "plan" / "checkpoints").iterdir())) == 2  # two run directories


def test_a_dataset_larger_than_the_data_is_refused(tmp_path):
    plan = make_plan(tmp_path, layout(), global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN,
                     teacher_ckpt=make_teacher_checkpoint(tmp_path / "teacher"))
    plan = plan.model_copy(update={"job": plan.job.model_copy(update={"dataset_tokens": 1e9})})
    r = launch(write_plan(tmp_path / "big1.json", plan), 1, "--steps", 1, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "job.dataset_tokens = 1e+09" in r.stderr and "Traceback" not in r.stderr
