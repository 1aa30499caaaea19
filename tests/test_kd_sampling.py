"""Sampled teacher targets (sample:N, topk:M+sample:N): systematic draws are exact (counts floor or
ceil of N·p, summing to N), unbiased over the offset, priced at the planner's bytes, and the loss is
forward KL on p_hat exactly (float64 reference)."""

import math

import pytest

torch = pytest.importorskip("torch")

from executor.kd import kd_loss  # noqa: E402
from executor.kd.compression import (  # noqa: E402
    Payload,
    decode,
    encode,
    payload_shapes,
    row_offsets,
    systematic_draws,
)
from kdplan.schema.compression import Compression, parse_compression, sampled_loss_error  # noqa: E402

pytestmark = pytest.mark.executor

SAMPLED = ["sample:50", "sample:7", "topk:8+sample:48", "topk:1+sample:5"]


def teacher(n=23, v=300, seed=0, scale=3.0, dtype=torch.float64):
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale)


def counts(ids: torch.Tensor, v: int) -> torch.Tensor:
    return torch.stack([torch.bincount(r, minlength=v) for r in ids])


@pytest.mark.parametrize("n", [1, 7, 64, 301])
def test_counts_sum_to_n_and_are_floor_or_ceil_of_np(n):
    p = torch.softmax(teacher(v=300), -1)
    p[:, :5] = 0.0  # zero-probability ids are never drawn
    p = p / p.sum(-1, keepdim=True)
    u = torch.rand(p.shape[0], generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ids = systematic_draws(p, n, u)
    assert ids.shape == (p.shape[0], n)
    assert torch.equal(ids, ids.sort(-1).values)  # sorted: repeats are runs, counts implied
    c = counts(ids, 300)
    assert torch.equal(c.sum(-1), torch.full((p.shape[0],), n))
    assert int(c[:, :5].sum()) == 0
    np_ = n * p
    assert bool(((c >= torch.floor(np_ - 1e-9)) & (c <= torch.ceil(np_ + 1e-9))).all())


def test_unnormalised_rows_and_offsets_at_the_ends():
    p = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0]], dtype=torch.float64)  # total 8, not 1
    for u in (0.0, 1.0 - 2**-24, 0.5):
        c = counts(systematic_draws(p, 4, torch.tensor([u], dtype=torch.float64)), 5)[0]
        assert c.tolist() == [0, 1, 0, 3, 0]  # n·p = 1 and 3 exactly: any offset gives them


@pytest.mark.parametrize("fmt", ["sample:16", "topk:4+sample:16"])
def test_unbiased_mean_of_decoded_samples_converges_to_p(fmt):
    """E over the offset u of p_hat equals p exactly (tail of the hybrid: tail mass · p_v / tail).
    Each id's count is floor(N·p) or ceil(N·p) on at most two intervals of u, so the mean over K
    stratified offsets u = (i + 1/2)/K is within 2/K counts of N·p: the tolerance 2/(K·N) on p_hat
    checks unbiasedness, not luck (a biased estimator, e.g. top-k renormalised, misses by far more)."""
    c, v, K = parse_compression(fmt), 40, 2000
    t = teacher(n=3, v=v, scale=2.0)
    p = torch.softmax(t, -1)
    mean = torch.zeros(3, v, dtype=torch.float64)
    for i in range(K):
        u = torch.full((3,), (i + 0.5) / K, dtype=torch.float64)
        tgt = decode(encode(t, c, temperature=1.0, offsets=u))
        ph = torch.zeros(3, v, dtype=torch.float64).scatter_add_(1, tgt.indices, tgt.logprobs.double().exp())
        assert torch.allclose(ph.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-6)  # a distribution
        mean += ph / K
    n = c.samples
    if c.k:  # the head is exact up to its 8-bit values; the tail is unbiased
        head = p.topk(c.k, -1).indices
        tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, head, False)
        tail_mass = (p * tail).sum(-1, keepdim=True).expand_as(p)
        assert bool(((mean - p).abs()[tail] <= 2 * tail_mass[tail] / (K * n) + 1e-9).all())
        assert torch.allclose(mean.gather(1, head), p.gather(1, head), rtol=0.05)
    else:
        assert bool(((mean - p).abs() <= 2.0 / (K * n) + 1e-9).all())


@pytest.mark.parametrize("fmt", SAMPLED)
@pytest.mark.parametrize("vocab", [300, 8192, 50_257])
def test_payload_bytes_equal_the_formula(fmt, vocab):
    c = parse_compression(fmt)
    n = 29
    p = encode(teacher(n, vocab, dtype=torch.float32), c, temperature=2.0)
    bits = math.ceil(math.log2(vocab))
    head = (c.k + c.k * bits / 8 + 4 + 4) if c.k else 0  # topk:M:8: values, ids, scale, tail mass
    assert c.bytes_per_token(vocab) == head + c.samples * bits / 8
    planned = c.bytes_per_token(vocab) * n
    assert planned <= p.nbytes < planned + 2  # each packed array rounds up to whole bytes
    assert [(tuple(t.shape), t.dtype) for t in p.tensors()] == payload_shapes(n, vocab, c)


@pytest.mark.parametrize("fmt", SAMPLED)
def test_received_buffers_decode_like_the_sent_payload(fmt):
    """The disaggregated stream: a receiver preallocates Payload.empty and copies the tensors in."""
    c, t = parse_compression(fmt), teacher(dtype=torch.float32)
    sent = encode(t, c, temperature=1.5)
    recv = Payload.empty(t.shape[0], t.shape[1], c, temperature=1.5)
    for a, b in zip(recv.tensors(), sent.tensors()):
        a.copy_(b)
    x, y = decode(sent), decode(recv)
    assert y.sampled and torch.equal(x.indices, y.indices) and torch.equal(x.logprobs, y.logprobs)


@pytest.mark.parametrize("fmt", SAMPLED)
def test_chunked_encode_is_the_whole_encode(fmt):
    c, t = parse_compression(fmt), teacher(n=37, dtype=torch.float32)
    u = torch.rand(37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = encode(t, c, temperature=1.0, offsets=u)
    pieces = encode(t, c, temperature=1.0, offsets=u, chunk_elems=8 * 300)
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors(), pieces.tensors()))


@pytest.mark.parametrize("fmt", SAMPLED)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_is_forward_kl_on_p_hat(fmt, temperature):
    """kd_loss on the decoded target equals the float64 KL(p_hat ‖ q) and its gradient q − p_hat
    (T² scaled), with p_hat built densely only here, in the reference."""
    c, n, v = parse_compression(fmt), 23, 300
    tgt = decode(encode(teacher(n, v, dtype=torch.float32), c, temperature=temperature))
    s = teacher(n, v, seed=5, scale=1.0).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    labels[3] = -100
    out = kd_loss(s, tgt, labels, temperature=temperature, alpha=1.0, chunk_tokens=7)
    out.total_sum.backward()
    ph = torch.zeros(n, v, dtype=torch.float64).scatter_add_(1, tgt.indices, tgt.logprobs.double().exp())
    assert torch.allclose(ph.sum(-1), torch.ones(n, dtype=torch.float64), atol=1e-6)
    s2 = s.detach().clone().requires_grad_()
    lq = torch.log_softmax(s2 / temperature, -1)
    valid = (labels != -100).double()
    ref = ((torch.xlogy(ph, ph) - ph * lq).sum(-1) * valid).sum() * temperature**2
    ref.backward()
    assert float(out.kd_sum.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_sampled_target_refuses_biased_losses(loss):
    c = parse_compression("sample:8")
    tgt = decode(encode(teacher(n=4, dtype=torch.float32), c, temperature=1.0))
    with pytest.raises(ValueError, match="only under forward_kl"):
        kd_loss(teacher(n=4, v=300), tgt, torch.zeros(4, dtype=torch.long), loss=loss)
    assert "forward_kl" in sampled_loss_error(c, loss)
    assert sampled_loss_error(c, "forward_kl") is None and sampled_loss_error(Compression("topk", 8), loss) is None


def test_row_offsets_depend_on_the_sample_and_position_only():
    h = ["0f" * 32, "a1" * 32]
    u = row_offsets(h, 64)
    assert u.shape == (128,) and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u[64:], row_offsets(h[1:], 64))  # a sample's offsets do not depend on its batch
    assert len(set(u.tolist())) == 128
    # roughly uniform: 10 bins of 12,800 offsets, each within 5 standard deviations of 1,280
    many = row_offsets([f"{i:08x}" + "0" * 56 for i in range(200)], 64)
    hist = torch.histc(many.float(), bins=10, min=0.0, max=1.0)
    assert bool(((hist - 1280).abs() < 5 * math.sqrt(1280 * 0.9)).all())


def test_hybrid_whose_head_holds_all_the_mass():
    """Tail mass 0 (a one-hot teacher): the tail draws carry weight 0, p_hat is the head, the loss finite."""
    t = torch.full((3, 50), -1e4)
    t[:, 7] = 0.0
    tgt = decode(encode(t, parse_compression("topk:1+sample:4"), temperature=1.0))
    ph = torch.zeros(3, 50, dtype=torch.float64).scatter_add_(1, tgt.indices, tgt.logprobs.double().exp())
    assert torch.allclose(ph[:, 7], torch.ones(3, dtype=torch.float64)) and float(ph.sum()) == pytest.approx(3.0)
    s = torch.zeros(3, 50, requires_grad=True)
    out = kd_loss(s, tgt, torch.zeros(3, dtype=torch.long), alpha=1.0)
    out.total_sum.backward()
    assert float(out.kd_sum.detach()) == pytest.approx(3 * math.log(50), rel=1e-5) and torch.isfinite(s.grad).all()
