"""Teacher-output compression: what travels from teacher ranks to student ranks (or to disk).

Formats (kdplan.schema.compression, whose ``bytes_per_token`` the planner prices):

``dense``         raw teacher logits [N, V] in bf16 (the loss applies the temperature).
``topk:K``        the K largest teacher log-probs at the KD temperature in fp16 [N, K], their ids
                  bit-packed in ceil(log2 V) bits, and the tail mass 1 − Σ top-k probabilities (fp32 [N]).
``topk:K:8|4``    the same with values quantised to 8 or 4 bits (4-bit: two per byte) against one
                  fp32 scale per row.
``sample:N``      N ids per position by systematic resampling of the teacher's distribution at the
                  KD temperature (``systematic_draws``), sorted and bit-packed; decoded as p_hat =
                  counts / N (a sampled ``TeacherTarget``: forward KL only).
``topk:M+sample:N``  ``topk:M:8``'s tensors (the exact head and the tail mass), then N draws from the
                  renormalised tail, bit-packed; p_hat = head + tail mass · counts / N.

Quantised values are stored relative to the row's top-1 log-prob, r_i = l_i − l_1 ∈ [−R, 0], as
round(−r_i / s) with s = R / (2^bits − 1); no offset is sent. The decoder rebuilds l_1 from the tail
mass, l_1 = log(1 − tail) − logsumexp(r), so the decoded top-k probabilities sum to exactly 1 − tail
and the only error is the rounding: |decoded − true| ≤ s (half a step from r, half from l_1). The
fp16 values are re-normalised the same way, with error ≤ 2·|l|·2⁻¹¹.

Size: ``Payload.nbytes`` = N × ``Compression.bytes_per_token(V)`` up to the rounding of each
bit-packed array to whole bytes (< 1 byte per array, at most 2 per payload); there is no header —
the receiver knows N, V, the compression and the temperature from the plan (``payload_shapes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdplan.schema.compression import Compression

from .losses import LOGP_FLOOR, TeacherTarget

FP16_MIN = -65504.0


def index_bits(vocab_size: int) -> int:
    """Bits per packed token id (same formula as the planner's bytes_per_token)."""
    return max(1, math.ceil(math.log2(vocab_size)))


# ---- bit packing -------------------------------------------------------------------------------


# Transient memory bounds (elements per piece): bit (un)packing works on PACK_CHUNK_ELEMS values
# at a time (int32 bitmaps of PACK_CHUNK_ELEMS x bits: 8.5 MiB at 17 bits), and ``encode`` takes
# the float32 log-softmax of ENCODE_CHUNK_ELEMS logits at a time (128 MiB), so neither grows with
# the micro-batch: a [16384, 50257] top-1024 encode used to build a 2 GiB int64 bitmap and a 3 GiB
# float32 copy of the logits on top of the logits themselves.
PACK_CHUNK_ELEMS = 1 << 18
ENCODE_CHUNK_ELEMS = 1 << 25


def _chunk(n: int) -> int:
    """A chunk length that keeps packed pieces byte-aligned (a multiple of 8 values)."""
    return max(8, n // 8 * 8)


def pack_bits(x: torch.Tensor, bits: int, *, chunk: int = PACK_CHUNK_ELEMS) -> torch.Tensor:
    """Pack non-negative integers < 2^bits (any shape) into uint8 [ceil(numel·bits/8)], LSB first.
    Works ``chunk`` values at a time (transient int32 [chunk, bits]); the stream is the same for
    any chunk size."""
    flat = x.reshape(-1)
    count, c = flat.numel(), _chunk(chunk)
    idt = torch.int32 if bits <= 31 else torch.int64
    out = torch.empty(_packed_len(count, bits), dtype=torch.uint8, device=flat.device)
    shifts = torch.arange(bits, device=flat.device, dtype=idt)
    weights = torch.arange(8, device=flat.device, dtype=torch.int32)
    for a in range(0, count, c):
        bitmap = ((flat[a:a + c].to(idt)[:, None] >> shifts) & 1).to(torch.int32).reshape(-1)
        pad = (-bitmap.numel()) % 8  # only the last piece
        if pad:
            bitmap = torch.cat([bitmap, bitmap.new_zeros(pad)])
        o = a * bits // 8  # a is a multiple of 8: byte-aligned
        out[o:o + bitmap.numel() // 8] = (bitmap.view(-1, 8) << weights).sum(1, dtype=torch.int32).to(torch.uint8)
    return out


def unpack_bits(buf: torch.Tensor, bits: int, count: int, *, chunk: int = PACK_CHUNK_ELEMS) -> torch.Tensor:
    """Inverse of ``pack_bits``: int64 [count], ``chunk`` values at a time."""
    c = _chunk(chunk)
    out = torch.empty(count, dtype=torch.int64, device=buf.device)
    shifts8 = torch.arange(8, device=buf.device, dtype=torch.int32)
    idt = torch.int32 if bits <= 31 else torch.int64
    weights = torch.arange(bits, device=buf.device, dtype=idt)
    for a in range(0, count, c):
        m = min(c, count - a)
        o = a * bits // 8
        piece = buf[o:o + _packed_len(m, bits)].to(torch.int32)
        bitmap = ((piece[:, None] >> shifts8) & 1).reshape(-1)[: m * bits].to(idt)
        out[a:a + m] = (bitmap.view(m, bits) << weights).sum(1)
    return out


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---- payload -----------------------------------------------------------------------------------


def payload_shapes(n: int, vocab_size: int, compression: Compression) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of a payload for ``n`` positions, in ``Payload.tensors()`` order,
    so a receiver can preallocate its ``irecv`` buffers."""
    if compression.kind == "dense":
        return [((n, vocab_size), torch.bfloat16)]
    if compression.sampled:
        return _sampled_shapes(n, vocab_size, compression)
    k, bits = compression.k, compression.bits
    if k > vocab_size:
        raise ValueError(f"{compression}: k={k} exceeds the vocabulary size {vocab_size}")
    if bits == 16:
        values = ((n, k), torch.float16)
    elif bits == 8:
        values = ((n, k), torch.uint8)
    else:
        values = ((_packed_len(n * k, 4),), torch.uint8)
    shapes = [values, ((_packed_len(n * k, index_bits(vocab_size)),), torch.uint8)]
    if bits < 16:
        shapes.append(((n,), torch.float32))  # per-row scale
    shapes.append(((n,), torch.float32))  # tail mass
    return shapes


@dataclass
class Payload:
    """Compressed teacher outputs for ``n`` positions; ``tensors`` in ``payload_shapes`` order."""

    compression: Compression
    n: int
    vocab_size: int
    temperature: float
    data: list[torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        return self.data

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data)

    @classmethod
    def empty(cls, n: int, vocab_size: int, compression: Compression, *, temperature: float, device="cpu") -> "Payload":
        """Preallocated receive buffers."""
        data = [torch.empty(s, dtype=d, device=device) for s, d in payload_shapes(n, vocab_size, compression)]
        return cls(compression, n, vocab_size, float(temperature), data)


def encode(teacher_logits: torch.Tensor, compression: Compression, *, temperature: float,
           chunk_elems: int = ENCODE_CHUNK_ELEMS, offsets: torch.Tensor | None = None) -> Payload:
    """Compress teacher logits [N, V] (any float dtype) into a Payload, on their device. Top-k
    works ``chunk_elems`` logits (whole rows, at least 8) at a time: its float32 temporaries are
    bounded by the chunk, not by N. Sampled formats take one uniform offset in [0, 1) per row
    (``offsets`` [N], e.g. ``row_offsets`` of the samples' content hashes, so every placement
    draws the same ids; None: ``torch.rand`` on the logits' device)."""
    n, vocab = teacher_logits.shape
    if compression.kind == "dense":
        return Payload(compression, n, vocab, float(temperature), [teacher_logits.detach().to(torch.bfloat16).contiguous()])
    if compression.sampled:
        return _encode_sampled(teacher_logits, compression, temperature=temperature, chunk_elems=chunk_elems,
                               offsets=offsets)
    k, bits = compression.k, compression.bits
    if k > vocab:
        raise ValueError(f"{compression}: k={k} exceeds the vocabulary size {vocab}")
    # Rows in pieces of ``rows`` (a multiple of 8, so every piece's packed ids and 4-bit values
    # end on a byte boundary and the pieces concatenate to the whole-tensor stream).
    rows = _chunk(max(1, chunk_elems // max(1, vocab)))
    vals_parts, idx_parts, q_parts, scale_parts, tail_parts = [], [], [], [], []
    with torch.no_grad():
        for a in range(0, max(n, 1), rows):  # one (empty) piece when n == 0
            lp = F.log_softmax(teacher_logits[a:a + rows].float() / temperature, dim=-1)
            vals, idx = lp.topk(k, dim=-1, sorted=True)  # descending: column 0 is the row maximum
            del lp
            vals = vals.clamp_min(LOGP_FLOOR)
            tail_parts.append((-torch.expm1(torch.logsumexp(vals, -1).clamp_max(0.0))).clamp(0.0, 1.0))
            idx_parts.append(pack_bits(idx, index_bits(vocab)))
            if bits == 16:
                vals_parts.append(vals.clamp_min(FP16_MIN).to(torch.float16))
            else:
                levels = (1 << bits) - 1
                r = vals - vals[:, :1]
                scale = -r[:, -1] / levels
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-equal row: any scale works
                q = torch.round(-r / scale[:, None]).clamp(0, levels).to(torch.uint8)
                q_parts.append(q if bits == 8 else pack_bits(q, 4))
                scale_parts.append(scale)
        packed_idx, tail = torch.cat(idx_parts), torch.cat(tail_parts)
        if bits == 16:
            data = [torch.cat(vals_parts), packed_idx, tail]
        else:
            data = [torch.cat(q_parts), packed_idx, torch.cat(scale_parts), tail]
    return Payload(compression, n, vocab, float(temperature), data)


def decode(payload: Payload, vocab_size: int | None = None) -> TeacherTarget:
    """Payload -> TeacherTarget (dense logits, or top-k ids and log-probs at the payload temperature)."""
    c, n = payload.compression, payload.n
    vocab = vocab_size or payload.vocab_size
    if c.kind == "dense":
        return TeacherTarget.dense(payload.data[0])
    if c.sampled:
        return _decode_sampled(payload, vocab)
    k, bits = c.k, c.bits
    values, packed_idx, *rest = payload.data
    tail = rest[-1].float()
    idx = unpack_bits(packed_idx, index_bits(vocab), n * k).reshape(n, k)
    if bits == 16:
        r = values.float()
    else:
        q = values if bits == 8 else unpack_bits(values, 4, n * k).reshape(n, k)
        r = -q.float() * rest[0][:, None]
    # Shift so that Σ exp(logprobs) = 1 − tail exactly (rebuilds l_1 for quantised rows).
    logp = r + (torch.log1p(-tail.clamp_max(1.0 - 1e-7)) - torch.logsumexp(r, -1))[:, None]
    return TeacherTarget.sparse(idx, logp, temperature=payload.temperature)


# ---- sampled targets: sample:N and topk:M+sample:N ----------------------------------------------


def _sampled_shapes(n: int, vocab_size: int, c: Compression) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The head's tensors (``topk:M:8``: values, ids, scale, tail mass) if any, then the N drawn ids."""
    head = payload_shapes(n, vocab_size, c.head()) if c.k else []
    return head + [((_packed_len(n * c.samples, index_bits(vocab_size)),), torch.uint8)]


def systematic_draws(probs: torch.Tensor, n: int, offsets: torch.Tensor) -> torch.Tensor:
    """Systematic resampling: per row of ``probs`` [R, V] (non-negative, any positive total, not
    necessarily normalised), the ids under the ``n`` points (u + j) / n, j = 0..n−1, of its CDF
    (scaled to the row's total), for the row's offset u = ``offsets`` [R] in [0, 1). Returns int64
    [R, n], sorted; an id of probability p is drawn floor(n·p) or ceil(n·p) times (exactly
    n·p in expectation over u), an id of probability 0 never. On the probs' device, no host sync.

    cumsum runs in the probs' dtype (float64 stays float64); rows of total 0 draw their last id
    (their weight is 0 in a hybrid target)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    j = torch.arange(n, device=probs.device, dtype=cdf.dtype)
    points = (offsets.to(cdf.dtype)[:, None] + j) / n * total
    ids = torch.searchsorted(cdf, points.contiguous(), right=True)
    # A point rounded up to the total lands past the last id of non-zero probability: pull it back
    # to the first id whose CDF reaches the total (the CDF rises there, so its probability is > 0).
    return torch.minimum(ids, torch.searchsorted(cdf, total.contiguous()))


_HASH_MASK = (1 << 32) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x·c mod 2^32 for int64 x in [0, 2^32), in 16-bit halves so no int64 product overflows."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & _HASH_MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) of int64 values in [0, 2^32), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_offsets(sample_hashes: list[str], seq_len: int, *, device=None) -> torch.Tensor:
    """Systematic-resampling offsets in [0, 1) for the rows of ``len(sample_hashes)`` samples of
    ``seq_len`` positions (float64 [n·seq_len], on ``device``): a function of each sample's content
    hash and the position only, so co-located, disaggregated and offline runs of any layout draw
    the same ids for the same sample. Only the samples' 32-bit seeds travel to the device."""
    seeds = torch.tensor([int(h[:8], 16) for h in sample_hashes], dtype=torch.int64, device=device)
    pos = torch.arange(seq_len, dtype=torch.int64, device=device)
    x = _mix32((_mix32(seeds)[:, None] + pos * 0x9E3779B9) & _HASH_MASK)
    return (((x >> 8).to(torch.float64) + 0.5) / float(1 << 24)).reshape(-1)  # 24 bits: exact in float32 too


def _encode_sampled(teacher_logits: torch.Tensor, c: Compression, *, temperature: float, chunk_elems: int,
                    offsets: torch.Tensor | None) -> Payload:
    n, vocab = teacher_logits.shape
    if c.k + 1 > vocab:
        raise ValueError(f"{c}: the head M={c.k} leaves no tail in the vocabulary of {vocab}")
    if offsets is None:
        offsets = torch.rand(n, device=teacher_logits.device, dtype=torch.float64)
    elif offsets.shape != (n,):
        raise ValueError(f"{c}: {tuple(offsets.shape)} offsets for {n} positions")
    offsets = offsets.to(teacher_logits.device)
    data: list[torch.Tensor] = []
    head_idx = None
    with torch.no_grad():
        if c.k:  # the exact head, as topk:M:8 encodes it; its ids are left out of the tail draws
            head = encode(teacher_logits, c.head(), temperature=temperature, chunk_elems=chunk_elems)
            data = list(head.data)
            head_idx = unpack_bits(head.data[1], index_bits(vocab), n * c.k).reshape(n, c.k)
        rows = _chunk(max(1, chunk_elems // max(1, vocab)))
        dt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
        parts = []
        for a in range(0, max(n, 1), rows):
            p = F.softmax(teacher_logits[a:a + rows].to(dt) / temperature, dim=-1)
            if head_idx is not None:
                p.scatter_(1, head_idx[a:a + rows], 0.0)
            parts.append(pack_bits(systematic_draws(p, c.samples, offsets[a:a + rows]), index_bits(vocab)))
            del p
        data.append(torch.cat(parts))
    return Payload(c, n, vocab, float(temperature), data)


def _decode_sampled(payload: Payload, vocab: int) -> TeacherTarget:
    """p_hat: each of the N drawn ids weighs 1/N (sample:N), or the decoded head (summing to
    1 − tail mass, as ``topk:M:8``) plus tail mass / N per drawn tail id."""
    c, n = payload.compression, payload.n
    ids = unpack_bits(payload.data[-1], index_bits(vocab), n * c.samples).reshape(n, c.samples)
    if not c.k:
        dev = ids.device
        return TeacherTarget.sample(ids, torch.full((n, c.samples), -math.log(c.samples), device=dev),
                                    temperature=payload.temperature)
    head = decode(Payload(c.head(), n, vocab, payload.temperature, payload.data[:-1]), vocab)
    tail = payload.data[-2].float()
    lw_tail = (torch.log(tail).clamp_min(LOGP_FLOOR) - math.log(c.samples))[:, None].expand(n, c.samples)
    return TeacherTarget.sample(torch.cat([head.indices, ids], 1), torch.cat([head.logprobs, lw_tail], 1),
                                temperature=payload.temperature)


# ---- hidden-state projection -------------------------------------------------------------------


class OrthogonalProjection:
    """Fixed random projection [h_t, d] with orthonormal columns (QR of a seeded Gaussian), so teacher
    hidden states can be sent in d < h_t dimensions (e.g. 4096 -> 1024) with distances preserved
    on average. Same matrix on every rank for the same (h_t, d, seed)."""

    def __init__(self, h_t: int, d: int, *, seed: int = 0):
        if not 0 < d <= h_t:
            raise ValueError(f"projection dimension d={d} must be in [1, h_t={h_t}]")
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(h_t, d, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        self.matrix = (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes the QR unique

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., h_t] -> [..., d] (float32 math, output in h's dtype)."""
        return (h.float() @ self.matrix.to(h.device)).to(h.dtype)
