"""Executor data: loading, BPE training and caching, packing, deterministic data-parallel batches."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from executor import data  # noqa: E402

pytestmark = pytest.mark.executor

SMALL = ["the quick brown fox jumps over the lazy dog. " * 20, "to be or not to be, that is the question. " * 20]


def test_load_texts_formats(tmp_path):
    shipped = data.load_texts(None)
    assert len(shipped) == 1 and shipped[0].startswith("First Citizen:") and len(shipped[0]) > 1_000_000
    (tmp_path / "a.txt").write_text("hello world")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["hello world"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert data.load_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each line needs a string \"text\" field"):
        data.load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        data.load_texts(str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        data.load_texts(str(tmp_path / "empty.txt"))


def test_load_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta", ""]}).save_to_disk(str(tmp_path / "ds"))
    assert data.load_texts(str(tmp_path / "ds")) == ["alpha", "beta"]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(ValueError, match='no "text" column'):
        data.load_texts(str(tmp_path / "nocol"))


def test_bpe_is_deterministic_cached_and_reloadable(tmp_path):
    a = data.get_tokenizer(texts=SMALL, vocab_size=300, cache_dir=str(tmp_path))
    b = data.get_tokenizer(texts=SMALL, vocab_size=300, cache_dir=str(tmp_path / "other"))
    assert a.get_vocab() == b.get_vocab()  # trained twice, same result
    cached = list(tmp_path.glob("bpe-*"))
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").exists()
    c = data.get_tokenizer(tokenizer_dir=str(cached[0]))
    assert c.get_vocab() == a.get_vocab() and c.eos_token == data.EOS
    text = "the lazy fox, or not"
    assert c.decode(c(text)["input_ids"]) == text
    assert len(data.get_tokenizer(texts=SMALL, vocab_size=280, cache_dir=str(tmp_path)).get_vocab()) <= 280
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.get_tokenizer(tokenizer_dir=str(tmp_path))


def test_tokenize_pack_split():
    tok = data.get_tokenizer(texts=SMALL, vocab_size=300)
    ids = data.tokenize(SMALL, tok)
    assert (ids == tok.eos_token_id).sum() == 2
    rows = data.pack(ids, 16)
    assert rows.shape == ((ids.numel() - 1) // 16, 17)
    # consecutive rows overlap by one token, so every token except the first is a label exactly once
    assert torch.equal(rows[:, 1:].reshape(-1), ids[1 : 1 + rows.shape[0] * 16])
    assert torch.equal(rows[1:, 0], rows[:-1, -1])
    train, held = data.split_heldout(rows, heldout_frac=0.1)
    assert held.shape[0] == round(rows.shape[0] * 0.1) and torch.equal(torch.cat([train, held]), rows)
    with pytest.raises(ValueError, match="too few"):
        data.pack(torch.arange(5), 16)


def test_batches_same_global_batch_whatever_dp():
    rows = torch.arange(50 * 5).reshape(50, 5)
    one = data.Batches(rows, global_batch=8, seed=1)
    for step in range(14):  # crosses an epoch boundary (6 steps per epoch)
        g = next(one)
        parts = [data.Batches(rows, global_batch=8, dp_rank=r, dp_size=4, seed=1).local_batch_at(step) for r in range(4)]
        assert torch.equal(torch.cat(parts), g)
        assert torch.equal(one.global_batch_at(step), g)
    assert one.epoch == 2 and one.steps_per_epoch == 6
    # within an epoch no row repeats; epochs are shuffled differently
    e0 = torch.cat([one.global_indices(s) for s in range(6)])
    e1 = torch.cat([one.global_indices(s) for s in range(6, 12)])
    assert e0.unique().numel() == 48 and not torch.equal(e0, e1)
    assert not torch.equal(data.Batches(rows, global_batch=8, seed=2).global_batch_at(0), one.global_batch_at(0))


def test_batches_resume_exactly():
    rows = torch.arange(40 * 3).reshape(40, 3)
    run = data.Batches(rows, global_batch=4, dp_rank=1, dp_size=2, seed=0)
    for _ in range(7):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives serialisation
    rest = [next(run) for _ in range(9)]
    resumed = data.Batches(rows, global_batch=4, dp_rank=1, dp_size=2, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in rest)
    with pytest.raises(ValueError, match="different global batch or seed"):
        data.Batches(rows, global_batch=4, seed=5).load_state_dict(state)


def test_batches_bad_arguments():
    rows = torch.zeros(10, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible"):
        data.Batches(rows, global_batch=5, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.Batches(rows, global_batch=16)
    with pytest.raises(ValueError, match="dp_rank"):
        data.Batches(rows, global_batch=4, dp_rank=2, dp_size=2)


def test_sample_hash_is_content_based():
    a = torch.tensor([1, 2, 3])
    assert data.sample_hash(a) == data.sample_hash(torch.tensor([1, 2, 3], dtype=torch.int32))
    assert data.sample_hash(a) != data.sample_hash(torch.tensor([1, 2, 4]))
    assert len(data.sample_hash(a)) == 64
