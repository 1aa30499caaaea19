"""KD losses against an independent float64 reference (probability space), hard cases included."""

import math

import pytest

torch = pytest.importorskip("torch")

from executor.kd.losses import IGNORE_INDEX, TeacherTarget, divergence, kd_loss  # noqa: E402

pytestmark = pytest.mark.executor


def ref_divergence(t_logits, s_logits, *, loss, temperature, beta=0.5):
    """Per-row divergence × T² in float64, straight from the definitions (kd-math §1-3); log-probs
    from float64 log_softmax so that values below −745 (where exp underflows) stay exact."""
    lp = torch.log_softmax(t_logits.double() / temperature, -1)
    lq = torch.log_softmax(s_logits.double() / temperature, -1)

    def kl(la, lb):
        return torch.where(la > -math.inf, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)

    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        d = kl(lp, lq)
    elif loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        d = kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        d = (beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)) / (beta * (1 - beta))
    return d * temperature**2


def ref_ce(s_logits, labels):
    return -torch.log_softmax(s_logits.double(), -1).gather(1, labels[:, None]).squeeze(1)


def ref_sparse_fkl(idx, lp_k, s_logits, temperature):
    """(k+1)-bucket forward KL in float64 (kd-math §5.4)."""
    lp_k = lp_k.double()
    q = torch.softmax(s_logits.double() / temperature, -1)
    p_k = lp_k.exp()
    q_k = q.gather(1, idx)
    tail_p = 1 - p_k.sum(-1)
    tail_q = 1 - q_k.sum(-1)
    d = (p_k * (lp_k - q_k.log())).sum(-1) + torch.where(tail_p > 0, tail_p * (tail_p.log() - tail_q.log()), 0.0)
    return d * temperature**2


def make(n=12, v=50, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    return s, t, labels


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.05])
def test_dense_matches_float64_reference(loss, beta, temperature):
    s, t, labels = make()
    out = kd_loss(s, TeacherTarget.dense(t), labels, loss=loss, temperature=temperature, alpha=0.3, beta=beta, chunk_tokens=5)
    kd_ref = ref_divergence(t, s, loss=loss, temperature=temperature, beta=beta).sum()
    ce_ref = ref_ce(s, labels).sum()
    assert out.num_tokens == 12
    assert out.kd_sum.item() == pytest.approx(kd_ref.item(), rel=2e-5, abs=1e-4)
    assert out.ce_sum.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert out.total_sum.item() == pytest.approx(0.3 * kd_ref.item() + 0.7 * ce_ref.item(), rel=2e-5, abs=1e-4)


def test_jsd_is_continuous_at_the_endpoints():
    """Normalised JSD: β → 0 gives forward KL, β → 1 reverse KL (no 1/β jump, kd-math §3)."""
    s, t, labels = make(seed=1)
    tgt = TeacherTarget.dense(t)
    fkl = kd_loss(s, tgt, labels, loss="forward_kl").kd_sum.item()
    rkl = kd_loss(s, tgt, labels, loss="reverse_kl").kd_sum.item()
    assert kd_loss(s, tgt, labels, loss="jsd", beta=0.0).kd_sum.item() == pytest.approx(fkl, rel=1e-6)
    assert kd_loss(s, tgt, labels, loss="jsd", beta=1.0).kd_sum.item() == pytest.approx(rkl, rel=1e-6)
    for eps in (1e-3, 1e-5, 1e-7, 1e-9):  # matches float64 near the ends, where 1/β amplifies rounding
        for b in (eps, 1 - eps):
            ref = ref_divergence(t, s, loss="jsd", temperature=1.0, beta=b).sum().item()
            assert kd_loss(s, tgt, labels, loss="jsd", beta=b).kd_sum.item() == pytest.approx(ref, rel=2e-6)
    # convergence is slow for far-apart p, q (the β-term grows like Σ p²/q) but it does converge
    assert kd_loss(s, tgt, labels, loss="jsd", beta=1e-9).kd_sum.item() == pytest.approx(fkl, rel=1e-5)
    assert kd_loss(s, tgt, labels, loss="jsd", beta=1 - 1e-7).kd_sum.item() == pytest.approx(rkl, rel=1e-3)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_hard_cases_never_nan_or_negative(loss):
    # log-probabilities far below -100 (scale 60 at T = 0.05 -> logits/T ~ ±1000s)
    s, t, labels = make(n=8, v=40, scale=60.0, seed=2)
    for temperature in (0.05, 1.0):
        out = kd_loss(s.requires_grad_(), TeacherTarget.dense(t), labels, loss=loss, temperature=temperature, alpha=0.5)
        ref = ref_divergence(t, s.detach(), loss=loss, temperature=temperature).sum().item()
        assert math.isfinite(out.kd_sum.item()) and out.kd_sum.item() >= 0
        assert out.kd_sum.item() == pytest.approx(ref, rel=1e-4, abs=1e-3)
        out.total_sum.backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None
    # identical distributions: exactly >= 0 (rounding must not produce a negative loss)
    same = kd_loss(t, TeacherTarget.dense(t), labels, loss=loss, temperature=0.05)
    assert 0 <= same.kd_sum.item() < 1e-3


def test_fully_masked_rows_and_nan_in_masked_positions():
    s, t, labels = make(n=10)
    labels[3:7] = IGNORE_INDEX
    t = t.clone()
    t[4] = float("nan")  # garbage in an ignored position must not leak
    s = s.requires_grad_()
    out = kd_loss(s, TeacherTarget.dense(t), labels, alpha=0.5, chunk_tokens=3)
    keep = labels != IGNORE_INDEX
    ref = ref_divergence(t[keep], s.detach()[keep], loss="forward_kl", temperature=1.0).sum()
    assert out.num_tokens == 6
    assert out.kd_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    out.total_sum.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[3:7] == 0).all()
    # everything masked: zero sums, still differentiable
    s2 = s.detach().clone().requires_grad_()
    out = kd_loss(s2, TeacherTarget.dense(t), torch.full((10,), IGNORE_INDEX), alpha=0.5)
    assert out.num_tokens == 0 and out.total_sum.item() == 0.0
    out.total_sum.backward()
    assert (s2.grad == 0).all()


def test_bf16_inputs_are_computed_in_float32():
    s, t, labels = make(dtype=torch.bfloat16, seed=3)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        out = kd_loss(s, TeacherTarget.dense(t), labels, loss=loss, temperature=2.0)
        ref = ref_divergence(t.float(), s.float(), loss=loss, temperature=2.0).sum()
        assert out.kd_sum.dtype == torch.float32
        assert out.kd_sum.item() == pytest.approx(ref.item(), rel=1e-5)


def test_teacher_minus_inf_sentinels():
    s, t, labels = make(n=6, v=30, seed=4)
    t[:, -5:] = float("-inf")  # e.g. padded vocabulary
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        x = s.clone().requires_grad_()
        out = kd_loss(x, TeacherTarget.dense(t), labels, loss=loss)
        out.total_sum.backward()
        assert math.isfinite(out.kd_sum.item()) and out.kd_sum.item() >= 0 and torch.isfinite(x.grad).all()
    fkl = kd_loss(s, TeacherTarget.dense(t), labels, loss="forward_kl").kd_sum.item()
    assert fkl == pytest.approx(ref_divergence(t, s, loss="forward_kl", temperature=1.0).sum().item(), rel=1e-5)


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_gradcheck_float64(loss, beta):
    s, t, labels = make(n=5, v=7, seed=5, dtype=torch.float64)
    labels[2] = IGNORE_INDEX
    s.requires_grad_()

    def f(x):
        return kd_loss(x, TeacherTarget.dense(t), labels, loss=loss, temperature=1.7, alpha=0.6, beta=beta, chunk_tokens=2).total_sum

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)


def test_forward_kl_gradient_is_tau_q_minus_p():
    """∂/∂s of τ²·KL(p‖q) = τ·(q − p) (kd-math §1), checked in float64."""
    s, t, labels = make(n=4, v=9, seed=6, dtype=torch.float64)
    s.requires_grad_()
    tau = 3.0
    kd_loss(s, TeacherTarget.dense(t), labels, temperature=tau, chunk_tokens=3).total_sum.backward()
    expected = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def _topk_target(t, k, temperature):
    lp = torch.log_softmax(t.double() / temperature, -1)
    vals, idx = lp.topk(k, -1)
    return idx, vals


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.05])
def test_sparse_topk_tail_matches_reference(temperature):
    s, t, labels = make(n=9, v=60, seed=7)
    idx, lp = _topk_target(t, 8, temperature)
    tgt = TeacherTarget.sparse(idx, lp.float(), temperature=temperature)
    x = s.clone().requires_grad_()
    out = kd_loss(x, tgt, labels, temperature=temperature, chunk_tokens=4)
    ref = ref_sparse_fkl(idx, lp, s, temperature).sum()
    assert out.kd_sum.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)
    out.total_sum.backward()
    assert torch.isfinite(x.grad).all()
    # the bucketed KL is a lower bound of the full KL (data-processing inequality)
    full = ref_divergence(t, s, loss="forward_kl", temperature=temperature).sum().item()
    assert out.kd_sum.item() <= full + 1e-4


def test_sparse_gradcheck_and_edge_cases():
    s, t, labels = make(n=4, v=10, seed=8, dtype=torch.float64)
    idx, lp = _topk_target(t, 3, 1.5)
    s.requires_grad_()
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        def f(x):
            return kd_loss(x, TeacherTarget.sparse(idx, lp, temperature=1.5), labels, loss=loss, temperature=1.5).total_sum

        assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)
    # k == V: no tail bucket; equals the dense forward KL
    idx_all, lp_all = _topk_target(t, 10, 1.0)
    out = kd_loss(s, TeacherTarget.sparse(idx_all, lp_all, temperature=1.0), labels)
    dense = kd_loss(s, TeacherTarget.dense(t), labels)
    assert out.kd_sum.item() == pytest.approx(dense.kd_sum.item(), rel=1e-9)
    # a teacher whose top-k holds all its mass (tail exactly 0) and a student with ~all mass in top-k
    lp0 = torch.full((4, 3), -math.log(3.0), dtype=torch.float64)
    s_conf = torch.full((4, 10), -200.0, dtype=torch.float64)
    s_conf.scatter_(1, idx, 0.0)
    out = kd_loss(s_conf.requires_grad_(), TeacherTarget.sparse(idx, lp0, temperature=1.0), labels)
    out.total_sum.backward()
    assert out.kd_sum.item() == pytest.approx(0.0, abs=1e-9) and torch.isfinite(s_conf.grad).all()


def test_sparse_temperature_mismatch_and_bad_arguments():
    s, t, labels = make()
    idx, lp = _topk_target(t, 4, 2.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        kd_loss(s, TeacherTarget.sparse(idx, lp, temperature=2.0), labels, temperature=1.0)
    with pytest.raises(ValueError, match="unknown KD loss"):
        kd_loss(s, TeacherTarget.dense(t), labels, loss="kl")
    with pytest.raises(ValueError, match="positions"):
        kd_loss(s, TeacherTarget.dense(t[:3]), labels)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, TeacherTarget.dense(t), labels, alpha=1.5)


def test_chunking_does_not_change_the_result_and_accepts_3d():
    s, t, labels = make(n=24, v=33, seed=9)
    tgt = TeacherTarget.dense(t)
    whole = kd_loss(s, tgt, labels, loss="jsd", alpha=0.5, chunk_tokens=10_000)
    for chunk in (1, 5, 7):
        part = kd_loss(s, tgt, labels, loss="jsd", alpha=0.5, chunk_tokens=chunk)
        assert part.total_sum.item() == pytest.approx(whole.total_sum.item(), rel=1e-6)
    three_d = kd_loss(s.reshape(4, 6, 33), tgt, labels.reshape(4, 6), loss="jsd", alpha=0.5)
    assert three_d.total_sum.item() == pytest.approx(whole.total_sum.item(), rel=1e-6)
    # micro-batch sums add up to the full-batch sum (normalise by the global token count)
    halves = sum(kd_loss(s[a : a + 12], tgt[a : a + 12], labels[a : a + 12], loss="jsd", alpha=0.5).total_sum for a in (0, 12))
    assert halves.item() == pytest.approx(whole.total_sum.item(), rel=1e-6)


def test_chunked_recompute_bounds_saved_memory():
    """With recompute, backward keeps only views of the inputs, not [N, V] float32 temporaries."""
    s, t, labels = make(n=256, v=2000, seed=10, dtype=torch.bfloat16)
    s.requires_grad_()
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size() if x.untyped_storage().data_ptr() not in (s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()) else 0)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = kd_loss(s, TeacherTarget.dense(t), labels, chunk_tokens=32)
    out.total_sum.backward()
    n_v_fp32 = 256 * 2000 * 4
    assert sum(saved) < n_v_fp32 / 8, sum(saved)
    # without recompute the autograd graph of all chunks holds several [N, V] float32 tensors
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        kd_loss(s, TeacherTarget.dense(t), labels, chunk_tokens=32, recompute=False)
    assert sum(saved) > n_v_fp32


def test_divergence_direct_on_logprobs():
    lp = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    assert torch.allclose(divergence(lp, lp, loss="jsd", beta=0.4), torch.zeros(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_no_host_sync_per_chunk(sparse):
    """Issue 12 item 12: on a GPU every .item()/int()/bool() of a tensor or boolean index stalls the
    stream. Meta tensors have no data, so any of those raises here: forward and backward must run."""
    n, v, k = 20, 50, 5
    s = torch.empty(n, v, device="meta", requires_grad=True)
    labels = torch.empty(n, dtype=torch.long, device="meta")
    if sparse:
        tgt = TeacherTarget.sparse(torch.empty(n, k, dtype=torch.long, device="meta"),
                                   torch.empty(n, k, device="meta"), temperature=2.0)
    else:
        tgt = TeacherTarget.dense(torch.empty(n, v, device="meta"))
    out = kd_loss(s, tgt, labels, temperature=2.0, alpha=0.5, chunk_tokens=7)
    out.total_sum.backward()
    assert s.grad.shape == (n, v) and out.num_tokens.device.type == "meta"


# ---- the teacher's side computed once for several students (prepare_target) ----------------------

PREPARED_CASES = [("dense", loss) for loss in ("forward_kl", "reverse_kl", "jsd")] + \
    [("topk:16", loss) for loss in ("forward_kl", "reverse_kl", "jsd")] + \
    [("topk:64", "forward_kl"), ("sample:32", "forward_kl"), ("topk:8+sample:16", "forward_kl")]


def _target(comp: str, t_logits: torch.Tensor, temperature: float) -> TeacherTarget:
    from executor.kd.compression import decode, encode
    from kdplan.schema.compression import parse_compression
    if comp == "dense":
        return TeacherTarget.dense(t_logits.clone())
    return decode(encode(t_logits.clone(), parse_compression(comp), temperature=temperature), t_logits.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("comp, loss", PREPARED_CASES)
def test_prepared_target_gives_the_same_losses_and_gradients_bit_for_bit(comp, loss, dtype):
    """Every student that reads a prepared target gets exactly the loss and gradient it would get
    from the raw target: same values to the last bit (masked rows holding NaN included, a chunk
    size that does not divide N, temperature != 1, top-k covering the vocabulary: topk:64), with
    fp32 and with bf16 teacher and student logits (a bf16 run: the target prepared in float32,
    the loss's dtype, as executor.train._kd prepares it). Tolerance: none (torch.equal)."""
    from executor.kd.losses import loss_dtype, prepare_target
    g = torch.Generator().manual_seed(3)
    N, V, T = 300, 64, 2.0
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = IGNORE_INDEX
    t[7] = float("nan")  # a masked row's garbage never reaches the loss, prepared or not
    t[11, :5] = float("-inf")  # ids outside the shared vocabulary (executor.teacher.shared_vocab_logits)
    raw = _target(comp, t, T)
    prepared = prepare_target(raw, temperature=T, vocab_size=V, chunk_tokens=128,
                              dtype=loss_dtype(torch.empty(0, dtype=dtype)))
    assert prepared.prepared and not raw.prepared
    for student in range(2):  # two students of one run, different logits
        s = (torch.randn(N, V, generator=g) * (1 + student)).to(dtype).requires_grad_()
        want = kd_loss(s, raw, labels, loss=loss, temperature=T, alpha=0.5, chunk_tokens=100)
        (gw,) = torch.autograd.grad(want.total_sum, s)
        got = kd_loss(s, prepared, labels, loss=loss, temperature=T, alpha=0.5, chunk_tokens=100)
        (gg,) = torch.autograd.grad(got.total_sum, s)
        assert torch.isfinite(want.total_sum)
        for a, b in ((got.total_sum, want.total_sum), (got.kd_sum, want.kd_sum), (got.ce_sum, want.ce_sum), (gg, gw)):
            assert torch.equal(a, b), (comp, loss, a, b)


@pytest.mark.parametrize("comp", ["dense", "topk:5", "sample:8"])
def test_prepared_target_gradcheck_float64(comp):
    from executor.kd.losses import prepare_target
    g = torch.Generator().manual_seed(1)
    N, V, T = 6, 11, 1.5
    t = torch.randn(N, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = IGNORE_INDEX
    raw = _target(comp, t.float(), T)
    raw = raw._map(lambda x: x.double() if x.is_floating_point() else x)
    prepared = prepare_target(raw, temperature=T, vocab_size=V, dtype=torch.float64)
    s = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda x: kd_loss(x, prepared, labels, temperature=T, alpha=0.7, chunk_tokens=4).total_sum  # noqa: E731
    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)
    want = kd_loss(s, raw, labels, temperature=T, alpha=0.7, chunk_tokens=4).total_sum
    assert torch.equal(f(s), want)


def test_prepared_targets_cut_and_join_like_raw_ones():
    """A student with another micro-batch size gets its rows re-cut from the prepared targets
    (executor.train.recut_target): slicing and TeacherTarget.cat keep them prepared and exact."""
    from executor.kd.losses import prepare_target
    g = torch.Generator().manual_seed(5)
    N, V, T = 40, 32, 2.0
    t = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    s = torch.randn(N, V, generator=g)
    for comp in ("dense", "topk:4", "sample:8"):
        raw = _target(comp, t, T)
        p = prepare_target(raw, temperature=T, vocab_size=V)
        joined = TeacherTarget.cat([p[:10], p[10:25], p[25:]])
        assert joined.prepared and joined.sampled == p.sampled
        assert all(torch.equal(a, b) for a, b in zip(joined.tensors(), p.tensors()))
        part = kd_loss(s[10:25], joined[10:25], labels[10:25], temperature=T).total_sum
        assert torch.equal(part, kd_loss(s[10:25], raw[10:25], labels[10:25], temperature=T).total_sum)
    with pytest.raises(ValueError, match="different kinds"):
        TeacherTarget.cat([p, _target("sample:8", t, T)])


def test_prepared_target_refuses_another_temperature_or_dtype():
    from executor.kd.losses import prepare_target
    V = 16
    t = torch.randn(8, V)
    p = prepare_target(TeacherTarget.dense(t), temperature=2.0, vocab_size=V)
    labels = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="prepared at temperature 2.0"):
        kd_loss(torch.randn(8, V), p, labels, temperature=1.0)
    with pytest.raises(ValueError, match="prepared in torch.float32"):
        kd_loss(torch.randn(8, V, dtype=torch.float64), p, labels, temperature=2.0)
    with pytest.raises(ValueError, match="prepared at temperature 2.0"):
        prepare_target(p, temperature=3.0, vocab_size=V)
    assert prepare_target(p, temperature=2.0, vocab_size=V) is p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_training_loss_is_the_ce_alone(monkeypatch, dtype):
    """No teacher (plain training, executor.train._kd with no target): the CE alone, no divergence
    computed (the loss used to compute a dense KD term against the student's own logits and drop
    it); the CE, its gradient and the total are bit-for-bit those of the old formulation."""
    import executor.kd.losses as losses
    from executor.train import _kd
    g = torch.Generator().manual_seed(8)
    N, V = 200, 48
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX
    s = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
    kd = type("KD", (), dict(loss="forward_kl", temperature=2.0, alpha=0.5, beta=0.5))  # a teacher's settings: unused
    old = kd_loss(s, TeacherTarget.dense(s.detach()), labels, alpha=0.0)
    (g_old,) = torch.autograd.grad(old.total_sum, s)

    def no_divergence(*a, **k):
        raise AssertionError("plain training computed a KD divergence")

    monkeypatch.setattr(losses, "divergence", no_divergence)
    new = _kd(s, None, labels, kd, V)
    (g_new,) = torch.autograd.grad(new.total_sum, s)
    assert torch.equal(new.total_sum, old.total_sum) and torch.equal(new.ce_sum, old.ce_sum)
    assert torch.equal(g_new, g_old)
    assert new.kd_sum.item() == 0.0 and int(new.num_tokens) == int((labels != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="alpha must be 0"):
        kd_loss(s, None, labels, alpha=0.5)


@pytest.mark.parametrize("comp", ["dense", "topk:8", "sample:16"])
def test_training_loss_prepares_the_target(monkeypatch, comp):
    """executor.train._kd (one student's loss per micro-batch, as training runs it) prepares its
    target once and gets the raw target's loss and gradient to the last bit; a target prepared
    already (several students: once per batch, executor.teacher.Targets.prepare) gives it too."""
    import executor.train as train
    from executor.kd.losses import prepare_target
    g = torch.Generator().manual_seed(9)
    N, V, T = 64, 40, 2.0
    t = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    s = torch.randn(N, V, generator=g).requires_grad_()
    kd = type("KD", (), dict(loss="forward_kl", temperature=T, alpha=0.5, beta=0.5))
    raw = _target(comp, t, T)
    calls = []
    monkeypatch.setattr(train, "prepare_target", lambda x, **k: calls.append(x.prepared) or prepare_target(x, **k))
    got = train._kd(s, raw, labels, kd, V)
    want = kd_loss(s, raw, labels, temperature=T, alpha=0.5)
    assert calls == [False]
    assert torch.equal(got.total_sum, want.total_sum)
    assert torch.equal(torch.autograd.grad(got.total_sum, s)[0], torch.autograd.grad(want.total_sum, s)[0])
    once = prepare_target(raw, temperature=T, vocab_size=V)
    assert train._kd(s, once, labels, kd, V).total_sum.equal(want.total_sum)
    assert calls == [False, True]  # handed over as it was: prepare_target returns a prepared target as is
