"""The offline teacher-output cache: one safetensors file per sample, found by content.

Layout: ``<output_dir>/<plan|baseline>/teacher_outputs/<key>/<sample hash>.safetensors``.

- ``<sample hash>`` is ``executor.data.sample_hash`` of the sample's token ids, so any layout,
  data-parallel size, epoch, resume or new run directory finds a sample's outputs.
- ``<key>`` (``cache_key``) names everything else the stored outputs depend on: the teacher's
  identity (``weights_sha256``: its weight files and config, by content, not by path or time),
  the format (kd.compression), the temperature, the tables the logits are laid over
  (kd.vocab_size, the student's vocabulary), the compute precision and the teacher's forward
  precision. A different teacher or format never reads another's files.
- Each file carries, in its safetensors metadata, the full key, the sample hash and a sha256 of
  its tensors (dtype, shape and bytes); ``read_sample`` checks all three and the tensors' shapes
  against the format's (``payload_shapes``), and raises ``CacheDamaged`` otherwise: a truncated,
  bit-flipped or foreign file is never used. The offline pass makes the cheaper
  ``check_sample`` of every file (header, shapes, length: not the sha256, which would read the
  whole cache at every launch) and rewrites what fails; a file that fails only when read is
  removed by the reader (executor.teacher.Targets), so the next pass rewrites it. ``write_sample`` writes to a temporary file unique
  to the writer (pid and a random suffix) and renames it into place, so concurrent writers of
  the same sample (other ranks, other runs sharing the directory) leave one whole file.
- ``CacheWriter`` writes in the background as training runs (online_then_cache: the first epoch's
  online teacher outputs), with the same ``write_sample``: the same files, keys and bytes as the
  offline pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from kdplan.schema import Plan

from .kd.compression import Payload, payload_shapes

FORMAT_VERSION = "kdplan-teacher-cache-1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CacheDamaged(RuntimeError):
    """A cached file that must not be used (truncated, altered, or written for another key)."""


def weights_sha256(checkpoint: str | Path, memo_dir: Path | None = None) -> str:
    """sha256 of a checkpoint directory's weight files and config.json (names and contents, in
    name order): the teacher's identity for the cache. Hashing reads every byte once; the result
    is remembered in ``memo_dir`` under the files' paths, sizes and mtimes, so a later launch of
    the same unchanged checkpoint does not read it again."""
    d = Path(checkpoint)
    files = sorted(f for f in d.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise FileNotFoundError(f"teacher checkpoint {d}: no weight files (*.safetensors)")
    stamp = hashlib.sha256(json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in files]).encode()).hexdigest()[:24]
    memo = memo_dir / f"teacher-weights-{stamp}.sha256" if memo_dir is not None else None
    if memo is not None and memo.exists():
        text = memo.read_text().strip()
        if len(text) == 64:
            return text
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    return digest


def cache_key(plan: Plan, teacher_sha256: str) -> str:
    """What the cached outputs of a sample depend on besides its tokens, as one string."""
    kd = plan.kd
    parts = {"format": FORMAT_VERSION, "teacher": teacher_sha256, "compression": str(kd.compression),
             "temperature": float(kd.temperature), "kd_vocab": kd.vocab_size,
             "student_vocab": plan.student.model.vocab_size, "seq_len": plan.job.seq_len,
             "precision": plan.job.precision,
             "forward_precision": plan.teacher.layout.forward_precision if plan.teacher is not None else None}
    return json.dumps(parts, sort_keys=True)


def cache_dir(root: Path, key: str) -> Path:
    """``root / <16 hex digits of the key's sha256>``."""
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().to("cpu").contiguous()
        h.update(f"{c.dtype}:{tuple(c.shape)}\n".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def path_of(directory: Path, sample: str) -> Path:
    return directory / f"{sample}.safetensors"


def serialize(tensors: list[torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file of ``tensors`` (named "0", "1", ...) and ``meta``, the same bytes for the
    same contents: the header's keys in a fixed order (safetensors' own writer orders the metadata
    as a hash map does, which differs from one writer to the next), the tensors stored largest
    element first (each one aligned to its element size, as safetensors stores them)."""
    order = sorted(range(len(tensors)), key=lambda i: (-tensors[i].element_size(), str(i)))
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for i in order:
        t = tensors[i]
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[str(i)] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def write_sample(directory: Path, sample: str, payload: Payload, key: str) -> Path:
    """Write one sample's payload (atomic: a unique temporary file, then a rename): the same
    bytes whoever writes it (the offline pass, the online epoch of online_then_cache)."""
    tensors = [t.detach().to("cpu").contiguous() for t in payload.tensors()]
    meta = {"kdplan_cache": FORMAT_VERSION, "key": key, "sample": sample, "sha256": _digest(tensors)}
    dest = path_of(directory, sample)
    tmp = directory / f".{sample}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_bytes(serialize(tensors, meta))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def read_sample(directory: Path, sample: str, *, key: str, n: int, vocab_size: int, compression,
                temperature: float) -> Payload:
    """The cached payload of ``sample`` (on the CPU), checked; ``CacheDamaged`` naming the file
    and what is wrong when it is missing, unreadable, written for another key or sample, shaped
    for another format, or its tensors do not hash to what it recorded."""
    path = path_of(directory, sample)
    # One read of the whole file, then parsed from memory: safe_open reopens the path for the
    # tensors, and a concurrent writer's rename in between would pair one file's header with
    # another's data (seen in tests/test_exec_epochs.py: caught by the sha256, but a false alarm).
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CacheDamaged(f"{path}: missing") from None
    except OSError as e:
        raise CacheDamaged(f"{path}: unreadable ({e})") from None
    try:
        header = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + header]).get("__metadata__") or {}
        loaded = load(raw)
        tensors = [loaded[k] for k in sorted(loaded, key=lambda s: int(s) if s.isdigit() else -1)]
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as e:
        raise CacheDamaged(f"{path}: unreadable ({e})") from None
    if meta.get("kdplan_cache") != FORMAT_VERSION or meta.get("key") != key or meta.get("sample") != sample:
        raise CacheDamaged(f"{path}: written for another teacher, format or sample")
    want = payload_shapes(n, vocab_size, compression)
    got = [(tuple(t.shape), t.dtype) for t in tensors]
    if got != [(tuple(s), d) for s, d in want]:
        raise CacheDamaged(f"{path}: tensors {got} are not the {compression} payload of {n} positions")
    if _digest(tensors) != meta.get("sha256"):
        raise CacheDamaged(f"{path}: content does not match its sha256")
    return Payload(compression, n, vocab_size, float(temperature), tensors)


ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.bool: "BOOL"}


def check_sample(directory: Path, sample: str, *, key: str, n: int, vocab_size: int, compression,
                 temperature: float) -> None:
    """The cheap check the offline pass makes of every file before a run (a few hundred bytes
    read, not the file): present, its header readable, written for this key and sample, shaped
    as the format's payload, and as long as its header says (a truncated file fails). A flipped
    bit in the data passes; ``read_sample``'s sha256 catches it when the file is read."""
    path = path_of(directory, sample)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = int.from_bytes(f.read(8), "little")
            if not 0 < head <= min(size - 8, 1 << 20):
                raise CacheDamaged(f"{path}: unreadable (header of {head} bytes in a file of {size})")
            header = json.loads(f.read(head))
    except FileNotFoundError:
        raise CacheDamaged(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise CacheDamaged(f"{path}: unreadable ({e})") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("kdplan_cache") != FORMAT_VERSION or meta.get("key") != key \
            or meta.get("sample") != sample:
        raise CacheDamaged(f"{path}: written for another teacher, format or sample")
    want = [(list(s), ST_DTYPES.get(d)) for s, d in payload_shapes(n, vocab_size, compression)]
    try:
        got = [(header[str(i)]["shape"], header[str(i)]["dtype"]) for i in range(len(header))]
        end = max(header[str(i)]["data_offsets"][1] for i in range(len(header)))
    except (KeyError, TypeError, IndexError, ValueError):
        raise CacheDamaged(f"{path}: unreadable (tensor table)") from None
    if got != want:
        raise CacheDamaged(f"{path}: tensors {got} are not the {compression} payload of {n} positions")
    if size != 8 + head + end:
        raise CacheDamaged(f"{path}: {size} bytes, its header says {8 + head + end} (truncated or padded)")


class CacheWriter:
    """``write_sample`` on a background thread, for payloads produced while the student trains
    (online_then_cache): hashing and writing the files overlaps the next micro-batches.

    Device to host: on CUDA, ``put`` copies each payload tensor ``non_blocking`` into pinned host
    memory on the current stream (the one the payload was encoded on) and records an event after
    the copies; the thread waits on that event (``Event.synchronize``, blocking the thread only)
    before hashing, so the training stream never stalls on the copy, and the device buffers may be
    freed at once (the caching allocator reuses them on the same stream, after the copy). A plain
    ``.cpu()`` would synchronise the device at every micro-batch of the first epoch. On the CPU the
    tensors are cloned (a later in-place use of the logits cannot change what is written).

    At most ``max_pending`` payloads wait: a storage slower than training slows training down
    (back-pressure) instead of filling host memory. ``flush`` returns when every file put so far is
    renamed into place (visible to every rank sharing the directory) and re-raises a write's error;
    ``close`` flushes and ends the thread. A crash loses at most the pending files: each write is
    atomic (``write_sample``), so the directory never holds a torn file, and the next run's check
    (``check_sample``) finds the missing ones and writes them."""

    def __init__(self, directory: Path, key: str, *, max_pending: int = 64):
        self.directory, self.key = directory, key
        self.written = 0  # files renamed into place
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kdplan-cache-writer", daemon=True)
        self._thread.start()

    def put(self, sample: str, payload: Payload) -> None:
        self._raise()
        event = None
        host = []
        for t in payload.tensors():
            t = t.detach()
            if t.device.type == "cuda":
                h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)  # pinned host buffer
                h.copy_(t, non_blocking=True)
                host.append(h)
            else:
                host.append(t.clone())
        if any(t.device.type == "cuda" for t in payload.tensors()):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(payload.tensors()[0].device))
        self._q.put((sample, dataclasses.replace(payload, data=host), event))

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                sample, payload, event = item
                if event is not None:
                    event.synchronize()
                if self.error is None:
                    write_sample(self.directory, sample, payload, self.key)
                    self.written += 1
            except BaseException as e:  # re-raised on the training thread by put / flush
                self.error = e
            finally:
                self._q.task_done()
        self._q.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"teacher-output cache {self.directory}: a write failed ({self.error})") from self.error

    def flush(self) -> None:
        self._q.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()
