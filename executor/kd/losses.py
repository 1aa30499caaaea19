"""Knowledge-distillation losses (math: ../shared/reference/kd-math.md §1-3, §5.4, §7).

Shapes: N = token positions (batch × sequence, flattened), V = vocabulary, k = top-k entries.
All divergences are computed in float32 (float64 stays float64, for gradcheck) from any input
dtype, are scaled by T², are summed over valid positions (label != -100) and are never NaN or
negative. The caller divides the sums by the GLOBAL count of valid tokens across micro-batches and
data-parallel ranks (never a per-micro-batch mean).

Memory: the loss walks ``chunk_tokens`` rows at a time and (by default) wraps each chunk in
activation checkpointing, so the float32 [chunk, V] temporaries — log-softmax, probabilities,
gradients — exist for one chunk at a time, in forward and in backward; only views of the inputs are
saved. A [N, V] float32 tensor for the whole batch is never made (beyond the logits themselves).

Teacher -inf log-probabilities (padding sentinels) are floored at ``LOGP_FLOOR`` before the divergence:
e^-10000 is 0 in every float format, so forward KL is unchanged, while reverse KL and JSD stay
finite with usable gradients (their true value is +inf where the student has mass the teacher lacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOGP_FLOOR = -1.0e4
LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TeacherTarget:
    """What the student is distilled towards, for N positions.

    Dense: ``logits`` [N, V] teacher logits, or log-probabilities (same softmax); the loss applies the
    temperature. Sparse (top-k): ``indices`` [N, k] int64 and ``logprobs`` [N, k], the teacher's
    log-probabilities ALREADY at ``temperature``; the implied tail mass is 1 − Σ exp(logprobs).
    Sampled (``sampled=True``, from ``sample:N`` / ``topk:M+sample:N``): ``indices`` [N, K] and
    ``logprobs`` [N, K] the log of each slot's weight in p_hat; ids may repeat (a repeated id's
    weight is the sum over its slots) and the weights sum to 1: there is no tail.

    Prepared (``prepared=True``, made by ``prepare_target``): the teacher's side of the loss already
    computed, at ``temperature``, in the float dtype of its tensors, for every student that shares
    the target. Dense: ``logits`` holds log_softmax(logits / T) floored at LOGP_FLOOR. Top-k:
    ``logprobs`` [N, k + 1] the floored bucket log-probs (top-k, then the tail; [N, k] when k covers
    the vocabulary). Sampled: ``indices`` sorted per row, ``logprobs`` the slot log-weights in that
    order (floored), ``merged`` [N, K] the log of each slot's id's total weight.
    """

    logits: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    temperature: float = 1.0
    sampled: bool = False
    prepared: bool = False
    merged: torch.Tensor | None = None  # prepared sampled targets only

    @classmethod
    def dense(cls, logits: torch.Tensor) -> "TeacherTarget":
        return cls(logits=logits)

    @classmethod
    def sparse(cls, indices: torch.Tensor, logprobs: torch.Tensor, *, temperature: float) -> "TeacherTarget":
        if indices.shape != logprobs.shape:
            raise ValueError(f"top-k indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} differ in shape")
        return cls(indices=indices, logprobs=logprobs, temperature=float(temperature))

    @classmethod
    def sample(cls, indices: torch.Tensor, logweights: torch.Tensor, *, temperature: float) -> "TeacherTarget":
        """A sampled estimate p_hat: slot ``j`` of row ``i`` carries weight exp(logweights[i, j])
        on id indices[i, j] (repeats add up; the weights of a row sum to 1)."""
        t = cls.sparse(indices, logweights, temperature=temperature)
        t.sampled = True
        return t

    @property
    def is_sparse(self) -> bool:
        return self.logits is None

    @property
    def num_tokens(self) -> int:
        return (self.logprobs if self.is_sparse else self.logits).shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        if not self.is_sparse:
            return (self.logits,)
        return (self.indices, self.logprobs) + ((self.merged,) if self.merged is not None else ())

    def _map(self, fn) -> "TeacherTarget":
        """The same kind of target with ``fn`` applied to each of its tensors."""
        def f(t):
            return None if t is None else fn(t)
        return TeacherTarget(logits=f(self.logits), indices=f(self.indices), logprobs=f(self.logprobs),
                             temperature=self.temperature, sampled=self.sampled, prepared=self.prepared,
                             merged=f(self.merged))

    @classmethod
    def cat(cls, parts: list["TeacherTarget"]) -> "TeacherTarget":
        """Targets of consecutive positions as one (all of one kind: dense / top-k / sampled, prepared or not)."""
        first = parts[0]
        if any((p.is_sparse, p.sampled, p.prepared, p.temperature) != (first.is_sparse, first.sampled, first.prepared,
                                                                      first.temperature) for p in parts):
            raise ValueError("cannot concatenate teacher targets of different kinds or temperatures")
        def c(name):
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])
        return cls(logits=c("logits"), indices=c("indices"), logprobs=c("logprobs"), temperature=first.temperature,
                   sampled=first.sampled, prepared=first.prepared, merged=c("merged"))

    def __getitem__(self, rows) -> "TeacherTarget":
        """Rows (positions) of the target, e.g. one micro-batch: ``target[a:b]``."""
        return self._map(lambda t: t[rows])

    def to(self, device) -> "TeacherTarget":
        return self._map(lambda t: t.to(device))


class KDLossOut(NamedTuple):
    """Sums over valid positions. total = alpha·kd + (1 − alpha)·ce."""

    total_sum: torch.Tensor  # scalar
    kd_sum: torch.Tensor  # scalar, true divergence × T² (0 at the optimum)
    ce_sum: torch.Tensor  # scalar, cross-entropy with the labels at T = 1 (nats)
    num_tokens: torch.Tensor  # 0-dim int64 on the logits' device: valid positions in this call (no host sync)


def divergence(lp: torch.Tensor, lq: torch.Tensor, *, loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``lp`` [C, M] and student log-probs ``lq`` [C, M].

    forward_kl = KL(p‖q); reverse_kl = KL(q‖p); jsd = JSD_β / (β(1 − β)) with M_β = βp + (1 − β)q, which
    tends to forward KL as β → 0 and to reverse KL as β → 1 (kd-math §3). Returns [C], clamped at 0
    (rounding can make a ~0 divergence slightly negative).
    """
    if loss == "jsd" and beta <= 0.0:
        loss = "forward_kl"
    if loss == "jsd" and beta >= 1.0:
        loss = "reverse_kl"
    if loss == "forward_kl":
        out = (lp.exp() * (lp - lq)).sum(-1)
    elif loss == "reverse_kl":
        out = (lq.exp() * (lq - lp)).sum(-1)
    elif loss == "jsd":
        # log M − log q and log M − log p from the log-ratio d, in log space (no underflow below −104)
        # and with log1p(−β), so KL(q‖M)/β keeps its precision when β is tiny.
        d = lp - lq
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        lm_minus_lq = torch.logaddexp(log_b + d, torch.full_like(d, log_1mb))
        lm_minus_lp = torch.logaddexp(log_1mb - d, torch.full_like(d, log_b))
        kl_p_m = -(lp.exp() * lm_minus_lp).sum(-1)
        kl_q_m = -(lq.exp() * lm_minus_lq).sum(-1)
        out = kl_p_m / (1.0 - beta) + kl_q_m / beta
    else:
        raise ValueError(f"unknown KD loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return out.clamp_min(0.0)


def loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    """The dtype ``kd_loss`` computes in for these student logits (float64 stays float64, every
    other float dtype computes in float32): the dtype ``prepare_target`` must prepare in."""
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def _chunk_terms(s, labels, t_logits, t_idx, t_logp, t_merged=None, *, loss, temperature, beta, sampled=False,
                 prepared=False):
    """(kd_sum, ce_sum) for one chunk. s [C, V] student logits, labels [C]; dense t_logits [C, V] or
    sparse t_idx / t_logp [C, k]; ``prepared``: the teacher's side computed by ``prepare_target``
    (t_merged: a sampled target's merged log-weights). Rows with label −100 are masked by
    arithmetic, not dropped: their inputs are replaced by zeros (a prepared target's by a finite
    constant) first (so whatever they hold, even NaN, never reaches the loss or its gradient) and
    their terms are multiplied by 0. No host synchronisation: no boolean
    indexing, no ``.item()``/``bool()``/``int()`` of a tensor (on a GPU each one stalls the stream)."""
    valid = labels != IGNORE_INDEX
    keep = valid[:, None]
    dt = loss_dtype(s)
    s = torch.where(keep, s.to(dt), 0.0)
    lq = F.log_softmax(s / temperature, dim=-1)
    # CE is always reported (the caller logs it); kd_loss detaches it when alpha == 1.
    lq1 = lq if temperature == 1.0 else F.log_softmax(s, dim=-1)
    ce = -(lq1.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1) * valid).sum()
    if t_logits is None and t_logp is None:  # no teacher (plain training): CE only
        return ce.new_zeros(()), ce
    if prepared:
        kd = _prepared_divergence(keep, lq, t_logits, t_idx, t_logp, t_merged, loss=loss, beta=beta, sampled=sampled)
    elif t_logits is not None:
        lp = F.log_softmax(torch.where(keep, t_logits.to(dt), 0.0) / temperature, dim=-1).clamp_min(LOGP_FLOOR)
        kd = divergence(lp, lq, loss=loss, beta=beta)
    elif sampled:
        lw = torch.where(keep, t_logp.to(dt), -math.log(t_logp.shape[1]))  # masked rows: any proper p_hat
        kd = _sampled_forward_kl(torch.where(keep, t_idx, 0), lw, lq)
    else:
        lp_k = torch.where(keep, t_logp.to(dt), -math.log(t_logp.shape[1] + 1))  # a finite row with a tail
        kd = divergence(*_bucketed(torch.where(keep, t_idx, 0), lp_k, lq), loss=loss, beta=beta)
    return (kd * valid).sum() * temperature**2, ce


def _prepared_divergence(keep, lq, lp, idx, lp_b, merged, *, loss, beta, sampled):
    """The divergence per row from a prepared target (``prepare_target``): the student's side only.
    Masked rows get finite teacher values (any will do: their terms are multiplied by 0)."""
    if lp is not None:  # dense: log_softmax(teacher / T), floored
        return divergence(torch.where(keep, lp, -math.log(lp.shape[1])), lq, loss=loss, beta=beta)
    idx = torch.where(keep, idx, 0)
    if sampled:
        lw = torch.where(keep, lp_b, -math.log(lp_b.shape[1]))
        return _sampled_student_kl(idx, lw.exp(), torch.where(keep, merged, 0.0), lq)
    lp_b = torch.where(keep, lp_b, -math.log(lp_b.shape[1]))
    lq_k = lq.gather(1, idx)
    if idx.shape[1] >= lq.shape[1]:
        return divergence(lp_b, lq_k, loss=loss, beta=beta)
    lq_tail = lq.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
    return divergence(lp_b, torch.cat([lq_k, lq_tail[:, None]], 1), loss=loss, beta=beta)


def _sampled_forward_kl(idx: torch.Tensor, lw: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p_hat ‖ q) per row for a sampled target (kd-math §6): p_hat puts weight exp(lw[i, j]) on
    id idx[i, j], repeats adding up; q is the student's full softmax (lq [C, V]). Only the student's
    log-probs at the drawn ids are gathered, so the gradient is p_hat's, q − p_hat, exactly.

    KL = Σ_j w_j (log P_j − lq[idx_j]) with P_j the merged weight of slot j's id: ids are sorted per
    row so repeats are runs, and each run's total comes from a cumulative sum (no [C, V] target).
    The teacher's side (``_sampled_teacher``) depends on the target only: ``prepare_target`` does it
    once for every student."""
    idx, lw, log_merged = _sampled_teacher(idx, lw)
    return _sampled_student_kl(idx, lw.exp(), log_merged, lq)


def _sampled_student_kl(idx, w, log_merged, lq):
    return (w * (log_merged - lq.gather(1, idx))).sum(-1).clamp_min(0.0)


def _sampled_teacher(idx: torch.Tensor, lw: torch.Tensor):
    """(ids sorted per row, their log-weights floored in that order, log of each slot's id's merged
    weight): the teacher's half of ``_sampled_forward_kl``."""
    idx, order = idx.sort(dim=-1)
    lw = lw.gather(1, order).clamp_min(LOGP_FLOOR)
    w = lw.exp()
    k = idx.shape[1]
    pos = torch.arange(k, device=idx.device).expand_as(idx)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[:, 1:] = idx[:, 1:] != idx[:, :-1]
    last = torch.ones_like(idx, dtype=torch.bool)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos, k - 1).flip(1).cummin(dim=1).values.flip(1)
    cs = w.cumsum(dim=1)
    merged = cs.gather(1, end) - cs.gather(1, start) + w.gather(1, start)
    log_merged = torch.where(first & last, lw, merged.clamp_min(torch.finfo(w.dtype).tiny).log())
    return idx, lw, log_merged


def _bucketed(idx: torch.Tensor, lp_k: torch.Tensor, lq: torch.Tensor):
    """Teacher and student log-probs over the k+1 buckets (top-k ids + one tail), kd-math §5.4.

    Teacher tail log(1 − m) = log(−expm1(logsumexp(lp_k))), floored (m may round to ≥ 1). Student
    tail log(1 − q_K) is the logsumexp over the complement of the top-k ids, which is exact even
    when q_K rounds to 1 in float32 (no 1 − eps clamp anywhere, cf. DistillKit#45).
    """
    lq_k = lq.gather(1, idx)
    if idx.shape[1] >= lq.shape[1]:  # top-k covers the vocabulary: there is no tail bucket
        return lp_k.clamp_min(LOGP_FLOOR), lq_k
    lq_tail = lq.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
    return _bucketed_teacher(lp_k, lq.shape[1]), torch.cat([lq_k, lq_tail[:, None]], 1)


def _bucketed_teacher(lp_k: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The teacher's k + 1 bucket log-probs (floored top-k, then the tail); k alone when k covers
    the vocabulary (no tail bucket)."""
    lp_k = lp_k.clamp_min(LOGP_FLOOR)
    if lp_k.shape[1] >= vocab_size:
        return lp_k
    lse_p = torch.logsumexp(lp_k, dim=-1).clamp_max(0.0)
    lp_tail = torch.log(-torch.expm1(lse_p)).clamp_min(LOGP_FLOOR)
    return torch.cat([lp_k, lp_tail[:, None]], 1)


def prepare_target(target: TeacherTarget, *, temperature: float, vocab_size: int,
                   dtype: torch.dtype = torch.float32, chunk_tokens: int = 1024) -> TeacherTarget:
    """The teacher's side of ``kd_loss`` for ``target`` computed once: a raw target's loss
    recomputes it in every chunk twice (forward, and the recomputation of the checkpointed chunk in
    backward), and once more for every student that reads the same teacher outputs
    (executor.train.CoStudent). Training prepares every target (executor.train._kd: one student;
    executor.teacher.Targets.prepare: once per batch for several).

    Dense: log_softmax(logits / T) floored, [N, V] in ``dtype`` (the loss's compute dtype,
    ``loss_dtype``: float32, or float64 for float64 student logits); top-k: the k + 1 bucket
    log-probs; sampled: the rows' ids sorted, their log-weights and merged log-weights. Each is the
    very operation the unprepared loss runs per chunk, row by row, so every loss value and gradient
    is the same to the last bit (tests/test_kd_losses.py, tests/test_exec_prepared.py).
    Memory: a dense target becomes float32 [N, V], twice a bf16 target's bytes (a bf16 copy would
    not give the same losses; float32 is the loss's own precision): the fp32 workspace of one
    micro-batch that kdplan.cost.role.kd_buffer_bytes counts. Top-k and sampled targets are
    [N, k + 1] / [N, K] (3 x [N, K]) in ``dtype``: negligible next to the student's [N, V] logits.
    Works on any device; no host synchronisation."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target.prepared:
        if abs(target.temperature - temperature) > 1e-6 * temperature:
            raise ValueError(f"target prepared at temperature {target.temperature}, asked for {temperature}")
        return target
    if not target.is_sparse:
        x = target.logits
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        for a in range(0, x.shape[0], chunk_tokens):  # float32 temporaries for one chunk at a time
            out[a:a + chunk_tokens] = F.log_softmax(x[a:a + chunk_tokens].to(dtype) / temperature,
                                                    dim=-1).clamp_min(LOGP_FLOOR)
        return TeacherTarget(logits=out, temperature=float(temperature), prepared=True)
    if abs(target.temperature - temperature) > 1e-6 * temperature:
        raise ValueError(f"top-k teacher log-probs were made at temperature {target.temperature}, the loss uses"
                         f" {temperature}")
    if target.sampled:
        idx, lw, merged = _sampled_teacher(target.indices, target.logprobs.to(dtype))
        return TeacherTarget(indices=idx, logprobs=lw, merged=merged, temperature=target.temperature, sampled=True,
                             prepared=True)
    return TeacherTarget(indices=target.indices, logprobs=_bucketed_teacher(target.logprobs.to(dtype), vocab_size),
                         temperature=target.temperature, prepared=True)


def _check_target(target: TeacherTarget, *, V: int, loss: str, temperature: float, dtype: torch.dtype) -> None:
    """The target fits the loss: its temperature (top-k and prepared targets carry one), vocabulary,
    format (a sampled target is unbiased under forward KL only) and a prepared one's dtype."""
    if target.sampled and loss != "forward_kl":
        raise ValueError(f"a sampled teacher target (sample:N, topk:M+sample:N) is unbiased only under forward_kl; "
                         f"{loss} would be biased")
    if target.is_sparse:
        if abs(target.temperature - temperature) > 1e-6 * temperature:
            raise ValueError(
                f"top-k teacher log-probs were made at temperature {target.temperature}, the loss uses {temperature}"
            )
    elif target.logits.shape[-1] != V:
        raise ValueError(f"teacher vocabulary {target.logits.shape[-1]} != student vocabulary {V}")
    if target.prepared:
        if not target.is_sparse and abs(target.temperature - temperature) > 1e-6 * temperature:
            raise ValueError(f"target prepared at temperature {target.temperature}, the loss uses {temperature}")
        t_dt = (target.logprobs if target.is_sparse else target.logits).dtype
        if t_dt != dtype:
            raise ValueError(f"target prepared in {t_dt}, the loss computes in {dtype}")


def kd_loss(
    student_logits: torch.Tensor,
    target: TeacherTarget | None,
    labels: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    chunk_tokens: int = 1024,
    recompute: bool = True,
) -> KDLossOut:
    """KD loss sums for N positions.

    Args:
        student_logits: [N, V] (or [B, T, V], flattened) in any float dtype.
        target: TeacherTarget with N rows (dense [N, V] or top-k [N, k]; raw, or made once by
            ``prepare_target``: the same values to the last bit, without recomputing the teacher's
            side in every chunk, forward and backward). None: no teacher (plain training), the CE
            alone (``alpha`` must be 0; kd_sum is 0 and no divergence is computed).
        labels: [N] (or [B, T]) int64 next-token ids; −100 marks positions to ignore.
        loss: "forward_kl" | "reverse_kl" | "jsd" (normalised generalised JSD with ``beta``).
            Top-k targets use the (k+1)-bucket coarsening for all three (forward KL is kd-math
            §5.4; reverse KL / JSD are the same divergences between the bucketed distributions).
        temperature: T > 0; the divergence uses softmax(·/T) and is multiplied by T². Top-k targets
            carry their own temperature, which must equal this one.
        alpha: weight of the divergence; (1 − alpha) weighs the CE (always at T = 1).
        chunk_tokens: rows processed at a time (bounds the float32 temporaries to chunk × V).
        recompute: checkpoint each chunk so backward recomputes it instead of keeping it.

    Returns:
        KDLossOut(total_sum, kd_sum, ce_sum, num_tokens), sums over valid positions.

    Plain (local) tensors only: under tensor parallelism give the head ``output_layouts=Replicate()``
    (or gather the vocab-sharded logits) before calling it.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown KD loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta <= 1.0:
        raise ValueError(f"alpha and beta must lie in [0, 1], got alpha={alpha}, beta={beta}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    V = student_logits.shape[-1]
    s_all = student_logits.reshape(-1, V)
    labels = labels.reshape(-1)
    N = s_all.shape[0]
    if labels.shape[0] != N or (target is not None and target.num_tokens != N):
        raise ValueError(f"student has {N} positions, labels {labels.shape[0]}, teacher target "
                         f"{'none' if target is None else target.num_tokens}")
    if target is None:
        if alpha != 0.0:
            raise ValueError(f"no teacher target: the loss is the CE alone, alpha must be 0 (got {alpha})")
        target = TeacherTarget()  # no tensors: _chunk_terms computes the CE alone
    else:
        _check_target(target, V=V, loss=loss, temperature=temperature, dtype=loss_dtype(s_all))

    kd_sum = s_all[:0].to(loss_dtype(s_all)).sum()  # 0, but connected to the graph
    ce_sum = kd_sum
    # Every chunk is computed, even a fully masked one (skipping it would need its count on the
    # host): one kernel sequence per chunk and no host synchronisation anywhere in the loop.
    for a in range(0, N, chunk_tokens):
        t = target[a : a + chunk_tokens]
        args = (s_all[a : a + chunk_tokens], labels[a : a + chunk_tokens], t.logits, t.indices, t.logprobs, t.merged)
        kw = dict(loss=loss, temperature=temperature, beta=beta, sampled=target.sampled, prepared=target.prepared)
        if recompute and torch.is_grad_enabled() and s_all.requires_grad:
            # no RNG in the loss: no RNG state to stash (on a GPU that is a device-to-host copy)
            kd, ce = checkpoint(_chunk_terms, *args, use_reentrant=False, preserve_rng_state=False, **kw)
        else:
            kd, ce = _chunk_terms(*args, **kw)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    n_valid = (labels != IGNORE_INDEX).sum()
    if alpha == 1.0:
        ce_sum = ce_sum.detach()
        total = kd_sum
    elif alpha == 0.0:
        total = ce_sum
        kd_sum = kd_sum.detach()
    else:
        total = alpha * kd_sum + (1.0 - alpha) * ce_sum
    return KDLossOut(total, kd_sum, ce_sum, n_valid)
