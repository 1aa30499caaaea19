"""Brief teacher pre-training (so its outputs carry information) and the label-only student baseline.

Single process, CPU or one GPU: AdamW (weight decay on matrices), linear warm-up then cosine decay
to 10 % of the peak, gradient clipping at 1, optional dropout on the token embeddings and attention
probabilities. The result is cached under ``out_dir/teacher-<key>``, key = sha256 of (architecture,
data, hyper-parameters), so repeated runs and tests reuse it.

Settings for the tiny example (``RECOMMENDED``), measured here (held-out CE in nats/token on the last
5 % of tinyshakespeare, 8,192 BPE, 16 × 128 tokens per step, CPU seconds on one thread of a loaded
machine; 4 × 256 teacher ≈ 0.9 s/step, 2 × 128 student ≈ 0.37 s/step):

    steps  lr     teacher (4 × 256)       label-only student (2 × 128)
     64    2e-3   5.727 (61 s)            5.788 (24 s)     <- RECOMMENDED: in the 60-90 s budget
     96    4e-3   5.609 (90 s)            5.561 (36 s, 2 heads)
    300    2e-3   5.102 (train 4.73)      5.080 (train 4.82)
    150    2e-3   -                       5.394 (56 s)

At equal budget the teacher is at best 0.06 nats better: early on both models learn the same
n-gram statistics through the 8,192-row embedding and head, and by ~2 epochs the teacher already
over-fits (train-held-out gap 0.37 vs 0.26). The tiny example therefore ships a teacher
checkpoint (examples/tiny-cpu/teacher-ckpt, reproduced by benchmarks/train_tiny_teacher.py with
early stopping, as is the label-only baseline it is compared with): 350 steps reach 5.05 held-out,
but the best label-only 2 × 128 student reaches 4.87, so even that teacher is not better (dropout
and tied embeddings were tried, see its README). This brief pre-training is only the fallback for
jobs that name no teacher checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdplan.schema import ModelSpec

from . import models
from .data import pack, sample_hash

CACHE_VERSION = "pretrain-v1"  # bump when the training recipe changes, to invalidate caches


def add_embedding_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout on the token embeddings (GPT-2's embd_pdrop); HF Llama only has attention dropout."""
    if p <= 0:
        return
    emb = model.get_input_embeddings()
    emb.register_forward_hook(lambda mod, args, out: F.dropout(out, p, mod.training))


def add_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout on each block's attention and MLP outputs before the residual add (GPT-2's
    resid_pdrop), as forward hooks: training-time only, so the checkpoint stays a plain HF model."""
    if p <= 0:
        return

    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, mod.training),) + tuple(out[1:])
        return F.dropout(out, p, mod.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def lr_at(step: int, *, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def lm_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of rows [B, L + 1]."""
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, *, batch: int = 32) -> float:
    """Mean held-out cross-entropy in nats per token."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for a in range(0, rows.shape[0], batch):
        r = rows[a : a + batch]
        total += lm_loss(model, r).item() * r[:, 1:].numel()
        n += r[:, 1:].numel()
    model.train(was)
    return total / n


def train_lm(model, rows: torch.Tensor, *, steps: int, batch: int, lr: float, weight_decay: float, seed: int,
             warmup: int | None = None, log=None, eval_rows: torch.Tensor | None = None,
             eval_every: int = 0, patience: int = 0) -> list[float]:
    """Train ``model`` on next-token prediction over random batches of ``rows``; returns the losses.

    With ``eval_rows`` and ``eval_every``, the held-out loss is measured every ``eval_every`` steps
    and at the end; the model ends with the weights of the best evaluation (early stopping: training
    stops after ``patience`` evaluations without improvement, 0 = never) and ``model.best`` records
    (step, held-out loss) and ``model.evals`` the whole curve."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms and biases
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = warmup if warmup is not None else max(1, steps // 20)
    model.train()
    losses = []
    perm, pos = torch.randperm(rows.shape[0], generator=g), 0
    best, best_state, evals, bad = (None, math.inf), None, [], 0
    for step in range(steps):
        if pos + batch > rows.shape[0]:  # next epoch
            perm, pos = torch.randperm(rows.shape[0], generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps=steps, lr=lr, warmup=warmup)
        loss = lm_loss(model, rows[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
        if eval_rows is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            h = evaluate(model, eval_rows)
            evals.append((step + 1, h))
            if log is not None:
                log(step, loss.item(), heldout=h)
            if h < best[1]:
                best, bad = (step + 1, h), 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if patience and bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
        model.best, model.evals = best, evals
    model.eval()
    return losses


def _rows(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    return data if data.ndim == 2 else pack(data, seq_len)


def _key(spec: ModelSpec, rows: torch.Tensor, hp: dict) -> str:
    arch = spec.model_dump(mode="json", exclude={"name"})  # the name is often a path: not part of the key
    blob = json.dumps({"spec": arch, "data": sample_hash(rows), "hp": hp, "v": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Measured on this machine for the tiny example (see tests/test_teacher_quality.py and the module
# docstring): under one epoch of the corpus, so the teacher does not over-fit.
RECOMMENDED = dict(steps=64, batch=16, seq_len=128, lr=2e-3, weight_decay=0.1, dropout=0.0)


def pretrain_teacher(spec: ModelSpec, data: torch.Tensor, *, steps: int = RECOMMENDED["steps"],
                     batch: int = RECOMMENDED["batch"], seq_len: int = RECOMMENDED["seq_len"],
                     lr: float = RECOMMENDED["lr"], weight_decay: float = RECOMMENDED["weight_decay"],
                     dropout: float = RECOMMENDED["dropout"], seed: int = 0, out_dir=None, cache_dir=None,
                     tokenizer=None, heldout: torch.Tensor | None = None) -> Path:
    """Train a teacher from scratch on ``data`` (packed rows [n, seq_len + 1], or a token stream) and
    return its HF checkpoint directory (model.safetensors, config.json, pretrain.json, and the
    tokenizer when given). Cached under ``out_dir`` (``cache_dir`` is accepted as the same thing):
    an existing checkpoint with the same key is returned without training. ``heldout`` rows, if
    given, are evaluated and recorded in pretrain.json (they do not change the key)."""
    root = out_dir if out_dir is not None else cache_dir
    if root is None:
        raise ValueError("pretrain_teacher needs out_dir (the cache directory)")
    rows = _rows(data, seq_len)
    hp = dict(steps=steps, batch=batch, seq_len=seq_len, lr=lr, weight_decay=weight_decay, dropout=dropout, seed=seed)
    dest = Path(root) / f"teacher-{_key(spec, rows, hp)}"
    if (dest / "model.safetensors").exists():
        return dest
    model = train_labels_only(spec, data=rows, **hp)
    # everything goes into a partial directory first, renamed once complete (a killed run leaves no
    # checkpoint that looks finished)
    partial = models.save_checkpoint(model, dest.with_name(f".{dest.name}.partial-{os.getpid()}"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
    info = {"spec": spec.model_dump(mode="json"), "hyperparameters": hp, "train_seconds": model.train_seconds,
            "final_train_loss": sum(model.train_losses[-10:]) / len(model.train_losses[-10:])}
    if heldout is not None:
        info["heldout_loss"] = evaluate(model, _rows(heldout, seq_len))
    (partial / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    try:
        os.replace(partial, dest)
    except OSError:  # another process finished the same checkpoint first
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def train_labels_only(spec: ModelSpec, *, data: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float,
                      weight_decay: float, dropout: float, seed: int, log=None, resid_dropout: float = 0.0,
                      heldout: torch.Tensor | None = None, eval_every: int = 0, patience: int = 0):
    """A model of ``spec`` trained on the labels alone (teacher pre-training and the student baseline).
    ``dropout``: on the embeddings and attention probabilities; ``resid_dropout``: on the residual
    branches; ``heldout`` + ``eval_every``: early stopping on held-out loss (see ``train_lm``)."""
    rows = _rows(data, seq_len)
    model = models.build_model(spec, dropout=dropout)
    models.materialize(model, seed=seed)
    add_embedding_dropout(model, dropout)
    add_residual_dropout(model, resid_dropout)
    t0 = time.perf_counter()
    eval_rows = _rows(heldout, seq_len) if heldout is not None else None
    model.train_losses = train_lm(model, rows, steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed,
                                  log=log, eval_rows=eval_rows, eval_every=eval_every, patience=patience)
    model.train_seconds = time.perf_counter() - t0
    return model


# the comparison baseline of the brief: a student-sized model trained on labels alone
train_student_labels_only = train_labels_only
