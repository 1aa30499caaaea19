"""Teacher-output compression: round-trip error within the quantisation step, sizes equal the planner's."""

import math

import pytest

torch = pytest.importorskip("torch")

from executor.kd import TeacherTarget, kd_loss  # noqa: E402
from executor.kd.compression import (  # noqa: E402
    OrthogonalProjection,
    Payload,
    decode,
    encode,
    index_bits,
    pack_bits,
    payload_shapes,
    unpack_bits,
)
from kdplan.schema.compression import parse_compression  # noqa: E402

pytestmark = pytest.mark.executor

FORMATS = ["dense", "topk:64", "topk:64:8", "topk:16:4", "topk:1", "topk:7:4", "topk:5:8"]


def teacher(n=37, v=1000, seed=0, scale=4.0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 13, 17, 21])
def test_bit_packing_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2**bits, (101,), generator=g)
    buf = pack_bits(x, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == math.ceil(101 * bits / 8)
    assert torch.equal(unpack_bits(buf, bits, 101), x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("vocab", [1000, 8192, 50_257])
def test_payload_bytes_match_the_planner(fmt, vocab):
    c = parse_compression(fmt)
    n = 29
    p = encode(teacher(n, vocab), c, temperature=2.0)
    planned = c.bytes_per_token(vocab) * n
    # only the rounding of each bit-packed array up to whole bytes differs (< 1 byte per array)
    assert planned <= p.nbytes < planned + 2
    assert [(tuple(t.shape), t.dtype) for t in p.tensors()] == payload_shapes(n, vocab, c)


@pytest.mark.parametrize("fmt", FORMATS[1:])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_round_trip_within_quantisation_step(fmt, temperature):
    c = parse_compression(fmt)
    t = teacher()
    tgt = decode(encode(t, c, temperature=temperature), 1000)
    lp = torch.log_softmax(t.double() / temperature, -1)
    vals, idx = lp.topk(c.k, -1)
    assert torch.equal(tgt.indices, idx)
    assert tgt.temperature == temperature
    err = (tgt.logprobs.double() - vals).abs()
    if c.bits == 16:
        bound = 2 * vals.abs() * 2.0**-11 + 1e-6
    else:
        step = (vals[:, :1] - vals[:, -1:]) / (2**c.bits - 1)  # per-row quantisation step
        bound = step + 1e-5
    assert (err <= bound).all(), (err - bound).max()
    # the decoded top-k mass equals the true one (the tail is sent in fp32)
    m_true = vals.exp().sum(-1)
    assert torch.allclose(tgt.logprobs.double().exp().sum(-1), m_true, rtol=1e-5)
    # 8 bits must be much tighter than 4 bits on the same row
    if c.bits == 8:
        assert err.max() < 0.1


def test_dense_round_trip_is_bf16():
    t = teacher()
    tgt = decode(encode(t, parse_compression("dense"), temperature=1.0))
    assert not tgt.is_sparse and tgt.logits.dtype == torch.bfloat16
    assert torch.allclose(tgt.logits.float(), t, rtol=2**-8, atol=0)


def test_receiver_preallocates_and_decodes_the_same():
    c = parse_compression("topk:16:4")
    t = teacher(n=10, v=8192)
    sent = encode(t, c, temperature=2.0)
    got = Payload.empty(10, 8192, c, temperature=2.0)
    for dst, src in zip(got.tensors(), sent.tensors()):
        dst.copy_(src)  # stands for irecv into the preallocated buffers
    a, b = decode(sent), decode(got)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)


def test_compressed_targets_give_a_close_loss():
    """KD loss from a decoded top-k target approaches the dense loss as k and bits grow."""
    g = torch.Generator().manual_seed(3)
    t = teacher(n=64, v=512, seed=4)
    s = t + torch.randn(64, 512, generator=g)  # a student near its teacher
    labels = torch.randint(0, 512, (64,), generator=g)
    dense = kd_loss(s, TeacherTarget.dense(t), labels, temperature=2.0).kd_sum.item()
    losses = {}
    for fmt in ("topk:256", "topk:64", "topk:64:8", "topk:64:4"):
        tgt = decode(encode(t, parse_compression(fmt), temperature=2.0))
        losses[fmt] = kd_loss(s, tgt, labels, temperature=2.0).kd_sum.item()
    assert all(v <= dense * 1.05 for v in losses.values())  # bucketed KL ≤ full KL (+ rounding)
    assert losses["topk:256"] == pytest.approx(dense, rel=0.05)
    assert abs(losses["topk:64:8"] - losses["topk:64"]) < 0.02 * losses["topk:64"]


def test_bad_requests():
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        encode(teacher(v=10), parse_compression("topk:64"), temperature=1.0)
    assert index_bits(8192) == 13 and index_bits(8193) == 14 and index_bits(2) == 1


def test_orthogonal_projection():
    p = OrthogonalProjection(256, 64, seed=1)
    m = p.matrix
    assert m.shape == (256, 64)
    assert torch.allclose(m.T @ m, torch.eye(64), atol=1e-5)
    assert torch.equal(m, OrthogonalProjection(256, 64, seed=1).matrix)
    assert not torch.equal(m, OrthogonalProjection(256, 64, seed=2).matrix)
    h = torch.randn(3, 5, 256)
    assert p.project(h).shape == (3, 5, 64)
    # a vector inside the span keeps its norm
    v = m @ torch.randn(64)
    assert torch.allclose(p.project(v).norm(), v.norm(), rtol=1e-5)
    with pytest.raises(ValueError):
        OrthogonalProjection(8, 16)


# ---- bounded transient memory (issue 12 item 11) ------------------------------------------------


def _old_pack_bits(x, bits):
    """The whole-tensor packer before issue 12 (int64 bitmap of numel x bits): the byte-exact reference."""
    flat = x.reshape(-1).to(torch.int64)
    bitmap = ((flat[:, None] >> torch.arange(bits)) & 1).to(torch.uint8).reshape(-1)
    pad = (-bitmap.numel()) % 8
    if pad:
        bitmap = torch.cat([bitmap, bitmap.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bitmap.reshape(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


class _LargestAlloc(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the largest tensor any aten op creates inside the mode (views excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("bits", [4, 13, 17])
def test_chunked_packing_is_byte_exact_and_bounded(bits):
    n = 5003  # not a multiple of the chunk nor of 8
    x = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits))
    ref = _old_pack_bits(x, bits)
    for chunk in (8, 64, 1000, 1 << 20):
        with _LargestAlloc() as m:
            buf = pack_bits(x, bits, chunk=chunk)
        assert torch.equal(buf, ref), chunk
        # the output itself, or one chunk's int32 bitmap [chunk, bits]; the old packer made an
        # int64 [n, bits] bitmap (n x bits x 8 bytes = 10x the bound here at chunk 64)
        assert m.largest <= max(buf.numel(), min(chunk, n + 8) * bits * 4), (chunk, m.largest)
        with _LargestAlloc() as m:
            back = unpack_bits(buf, bits, n, chunk=chunk)
        assert torch.equal(back, x)
        assert m.largest <= max(n * 8, min(chunk, n + 8) * bits * 8), (chunk, m.largest)


@pytest.mark.parametrize("fmt", ["topk:64", "topk:16:4", "topk:7:8"])
def test_encode_in_row_chunks_is_exact_and_bounded(fmt):
    c = parse_compression(fmt)
    x = teacher(n=203, v=997)
    whole = encode(x, c, temperature=2.0, chunk_elems=10**9)
    with _LargestAlloc() as m:
        parts = encode(x, c, temperature=2.0, chunk_elems=16 * 997)  # 16 rows at a time
    for a, b in zip(whole.tensors(), parts.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # the float32 [16, V] log-softmax of one piece, or a payload tensor: never [N, V] float32
    assert m.largest <= max(16 * 997 * 4, max(t.numel() * t.element_size() for t in parts.tensors()))
    assert m.largest < x.numel() * 4 // 4
