"""Quality cost of each teacher-output compression, measured on this machine (one process).

Distils the tiny student (examples/tiny-cpu/student) from the pre-trained tiny teacher with dense and
top-k teacher outputs, all students from the same init on the same batches (the teacher runs once
per step and its logits go through encode -> decode for each compression), plus a label-only
student. Prints bytes per token (measured payload and the planner's formula), the student's
held-out cross-entropy, and its KL(teacher ‖ student) on held-out text at T = 1.

    OMP_NUM_THREADS=1 python benchmarks/compression_quality.py            # 48 steps: ~4 min of one core
    OMP_NUM_THREADS=1 python benchmarks/compression_quality.py --steps 2 --teacher-steps 2  # smoke run

Measured here (2026-11-28, shipped teacher: held-out CE 4.350; 150 student steps of 16 × 128
tokens, T = 1, alpha = 0.5; `--steps 150`, 736 s of one core):

    teacher outputs  bytes/token  held-out CE  KL(t‖s)
    labels only              0        5.359     1.176
    dense                16384        5.182     0.971
    topk:64                236        5.251     1.052
    topk:64:8              176        5.265     1.057
    topk:16:4               42        5.342     1.132

(2026-11-27, with a 300-step teacher of held-out CE 5.102 and 48 steps: labels 5.874, dense 5.688.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from executor import data, models, pretrain
from executor.kd import TeacherTarget, kd_loss
from executor.kd.compression import decode, encode
from kdplan.models import load_model_spec
from kdplan.schema.compression import parse_compression

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressions", default="dense,topk:64,topk:64:8,topk:16:4")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--teacher-ckpt", default=str(EXAMPLE / "teacher-ckpt"),
                    help="teacher checkpoint (default: the tiny example's shipped teacher); 'pretrain' trains one "
                         "for --teacher-steps instead (the executor's fallback pre-training)")
    ap.add_argument("--teacher-steps", type=int, default=pretrain.RECOMMENDED["steps"],
                    help="teacher pre-training steps with --teacher-ckpt pretrain")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "cache"), help="tokenizer and teacher cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    texts = data.load_texts(None)
    if args.teacher_ckpt == "pretrain":
        tok = data.get_tokenizer(texts=texts, vocab_size=8192, cache_dir=args.cache)
    else:
        tok = data.get_tokenizer(tokenizer_dir=str(EXAMPLE / "tokenizer"))
    rows = data.pack(data.tokenize(texts, tok), pretrain.RECOMMENDED["seq_len"])
    train, held = data.split_heldout(rows)
    t_spec = load_model_spec(str(EXAMPLE / "teacher"))
    s_spec = load_model_spec(str(EXAMPLE / "student"))
    t0 = time.perf_counter()
    if args.teacher_ckpt == "pretrain":
        hp = dict(pretrain.RECOMMENDED, steps=args.teacher_steps)
        ckpt = pretrain.pretrain_teacher(t_spec, train, tokenizer=tok, heldout=held, out_dir=args.cache, seed=0, **hp)
    else:
        ckpt = Path(args.teacher_ckpt)
    teacher = models.load_checkpoint(models.build_model(t_spec), ckpt).eval()
    print(f"teacher {ckpt.name}: ready in {time.perf_counter() - t0:.0f} s, held-out CE {pretrain.evaluate(teacher, held):.3f} nats/token")

    V = s_spec.vocab_size
    names = ["labels only"] + args.compressions.split(",")
    students, opts = {}, {}
    for name in names:
        m = models.materialize(models.build_model(s_spec), seed=1)  # same init for every student
        students[name] = m.train()
        opts[name] = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    nbytes = {n: 0 for n in names}
    batches = data.Batches(train, global_batch=args.batch, seed=2)
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows_b = next(batches)
        x, y = rows_b[:, :-1], rows_b[:, 1:].reshape(-1)
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.reshape(-1, V)
        lr = pretrain.lr_at(step, steps=args.steps, lr=args.lr, warmup=max(1, args.steps // 20))
        for name, m in students.items():
            logits = m(input_ids=x).logits.reshape(-1, V)
            if name == "labels only":
                loss = F.cross_entropy(logits, y)
            else:
                payload = encode(t_logits, parse_compression(name), temperature=args.temperature)
                nbytes[name] += payload.nbytes
                out = kd_loss(logits, decode(payload), y, temperature=args.temperature, alpha=args.alpha)
                loss = out.total_sum / out.num_tokens
            for g in opts[name].param_groups:
                g["lr"] = lr
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[name].step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  {time.perf_counter() - t0:.0f} s", flush=True)

    results = evaluate_all(teacher, students, held, V)
    tokens = args.steps * args.batch * 128
    print(f"\n{args.steps} steps × {args.batch} × 128 tokens, T = {args.temperature}, alpha = {args.alpha}; "
          f"teacher held-out CE {results['teacher'][0]:.3f}")
    print(f"{'teacher outputs':<14} {'bytes/token':>12} {'planner':>9} {'held-out CE':>12} {'KL(t‖s)':>9}")
    for name in names:
        ce, kl = results[name]
        measured = nbytes[name] / tokens if name != "labels only" else 0.0
        planned = parse_compression(name).bytes_per_token(V) if name != "labels only" else 0.0
        print(f"{name:<14} {measured:>12.1f} {planned:>9.1f} {ce:>12.3f} {kl:>9.3f}")


@torch.no_grad()
def evaluate_all(teacher, students, held, V, batch=16):
    """Held-out CE (nats/token) of the teacher and each student, and KL(teacher ‖ student) at T = 1."""
    sums = {n: [0.0, 0.0] for n in ["teacher", *students]}
    n_tok = 0
    for m in students.values():
        m.eval()
    for a in range(0, held.shape[0], batch):
        r = held[a : a + batch]
        x, y = r[:, :-1], r[:, 1:].reshape(-1)
        t_logits = teacher(input_ids=x).logits.reshape(-1, V)
        sums["teacher"][0] += F.cross_entropy(t_logits, y, reduction="sum").item()
        target = TeacherTarget.dense(t_logits)
        for name, m in students.items():
            out = kd_loss(m(input_ids=x).logits.reshape(-1, V), target, y, alpha=1.0)
            sums[name][0] += out.ce_sum.item()
            sums[name][1] += out.kd_sum.item()
        n_tok += y.numel()
    return {n: (ce / n_tok, kl / n_tok) for n, (ce, kl) in sums.items()}


if __name__ == "__main__":
    main()
