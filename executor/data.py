"""Text -> tokens -> fixed-length rows -> deterministic data-parallel batches.

``load_texts`` reads a .txt file (one document), a .jsonl file (a "text" field per line) or a HF
dataset saved with ``save_to_disk`` (a "text" column); ``None`` is the shipped corpus
(tinyshakespeare, public domain) so a fresh clone runs without any download.
``get_tokenizer`` loads a tokenizer directory or trains a byte-level BPE on the texts (cached by a
hash of texts and vocabulary size). ``pack`` cuts the token stream into rows of seq_len + 1 ids
(inputs = row[:-1], labels = row[1:]); ``split_heldout`` keeps the last rows for evaluation.
``Batches`` walks a seeded per-epoch permutation: the global batch of step s is a pure function of
(seed, s), and data-parallel rank r takes rows r·b:(r+1)·b of it, so the global batch is the same
whatever the dp size, and resuming needs only the step counter. ``dataset_rows`` cuts the rows to
the plan's fixed dataset (job.dataset_tokens): epochs are then ``steps * global_batch / rows``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import CORPUS  # the shipped corpus; defined torch-free so the launcher can hash it (executor.runs)

EOS = "<|endoftext|>"


def load_texts(path: str | None) -> list[str]:
    """Documents from ``path`` (.txt, .jsonl, or a saved HF dataset directory); None -> shipped corpus."""
    p = Path(path) if path is not None else CORPUS
    if not p.exists():
        raise FileNotFoundError(f"data {p}: no such file or directory")
    if p.is_dir():
        return _load_hf_dataset(p)
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data {p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'data {p}:{i}: each line needs a string "text" field')
            texts.append(row["text"])
    else:
        texts = [p.read_text(encoding="utf-8")]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"data {p}: no text found")
    return texts


def _load_hf_dataset(p: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data {p} is a directory (a saved HF dataset) but the `datasets` package is not installed") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise ValueError(f'data {p}: the dataset has no "text" column (columns: {ds.column_names})')
    return [t for t in ds["text"] if t]


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def get_tokenizer(*, tokenizer_dir: str | None = None, texts: list[str] | None = None, vocab_size: int = 8192, cache_dir: str | None = None):
    """A ``PreTrainedTokenizerFast``: loaded from ``tokenizer_dir``, or a byte-level BPE of ``vocab_size``
    trained on ``texts`` (deterministic) and cached in ``cache_dir/bpe-<hash>``."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"tokenizer {d}: no tokenizer.json")
        return PreTrainedTokenizerFast.from_pretrained(str(d))
    if not texts:
        raise ValueError("get_tokenizer needs tokenizer_dir or texts to train a BPE on")
    key = hashlib.sha256(f"{texts_hash(texts)}:{vocab_size}:bytelevel-bpe-v1".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"bpe-{key}" if cache_dir else None
    if cached is not None and (cached / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(cached))
    tok = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(texts, vocab_size), eos_token=EOS)
    if cached is not None:
        _save_atomic(tok, cached)
    return tok


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _save_atomic(tok, dest: Path) -> None:
    import os
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process cached it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    """One int64 token stream: documents joined by the EOS token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64, device="cpu")  # host data: batches move to the device in train


def pack(token_ids, seq_len: int) -> torch.Tensor:
    """LongTensor [n_seq, seq_len + 1]: row i = ids[i·L : i·L + L + 1] (consecutive rows share one
    token, so every token is a label once); the incomplete end is dropped."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for one sequence of {seq_len} + 1")
    return ids.unfold(0, seq_len + 1, seq_len)[:n].contiguous()


def split_heldout(rows: torch.Tensor, *, heldout_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``heldout_frac`` of the rows (at least one) are held out."""
    n_held = max(1, round(rows.shape[0] * heldout_frac))
    if n_held >= rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows are too few to hold out {n_held}")
    return rows[:-n_held], rows[-n_held:]


def dataset_rows(rows: torch.Tensor, dataset_tokens: float | None, *, seq_len: int, global_batch: int) -> torch.Tensor:
    """The run's fixed dataset (plan job.dataset_tokens): the first D rows, D = the tokens' rows
    rounded down to whole global batches, so that every epoch visits each of them exactly once
    (``Batches`` drops an epoch's last partial batch). None: every row. ValueError (one line)
    when the data holds fewer rows than that, or the tokens make no whole global batch."""
    if dataset_tokens is None:
        return rows
    want = int(dataset_tokens // seq_len) // global_batch * global_batch
    if want < global_batch:
        raise ValueError(f"job.dataset_tokens = {dataset_tokens:g} is less than one global batch of {global_batch}"
                         f" x {seq_len} tokens")
    if want > rows.shape[0]:
        raise ValueError(f"job.dataset_tokens = {dataset_tokens:g} asks for {want} sequences of {seq_len} tokens but"
                         f" the training data holds {rows.shape[0]}")
    return rows[:want]


def sample_hash(row: torch.Tensor) -> str:
    """Stable content hash of a sample (or of a whole [n, L] data set): sha256 of its token ids as
    little-endian int64, whatever the tensor's dtype or device."""
    return hashlib.sha256(row.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


class Batches:
    """Deterministic per-step batches of ``data`` [n, seq_len + 1].

    Step s lies in epoch e = s // steps_per_epoch; epoch e uses the permutation of a generator seeded
    with (seed, e); the global batch is ``global_batch`` consecutive entries of it (the last partial
    batch of an epoch is dropped) and rank r of dp_size gets its rows r·b:(r+1)·b, b = global/dp.
    """

    def __init__(self, data: torch.Tensor, *, global_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if data.shape[0] < global_batch:
            raise ValueError(f"{data.shape[0]} sequences are fewer than one global batch of {global_batch}")
        self.data, self.global_batch, self.seed = data, global_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch = global_batch // dp_size
        self.steps_per_epoch = data.shape[0] // global_batch
        self.step = 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.data.shape[0], generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """Row ids of the global batch of ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[i * self.global_batch : (i + 1) * self.global_batch]

    def global_batch_at(self, step: int) -> torch.Tensor:
        """The full global batch [global_batch, seq_len + 1] of ``step`` (single-process references)."""
        return self.data[self.global_indices(step)]

    def local_batch_at(self, step: int) -> torch.Tensor:
        b = self.local_batch
        return self.data[self.global_indices(step)[self.dp_rank * b : (self.dp_rank + 1) * b]]

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.local_batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch or state.get("seed", self.seed) != self.seed:
            raise ValueError("data state was saved with a different global batch or seed; resume would not be exact")
        self.step = int(state["step"])


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)
