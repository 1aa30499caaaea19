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
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

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


def write_sample(directory: Path, sample: str, payload: Payload, key: str) -> Path:
    """Write one sample's payload (atomic: a unique temporary file, then a rename)."""
    tensors = [t.detach().to("cpu").contiguous() for t in payload.tensors()]
    meta = {"kdplan_cache": FORMAT_VERSION, "key": key, "sample": sample, "sha256": _digest(tensors)}
    dest = path_of(directory, sample)
    tmp = directory / f".{sample}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_file({str(i): t for i, t in enumerate(tensors)}, str(tmp), metadata=meta)
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
