"""Train (reproduce) the tiny example's shipped teacher and its label-only student baseline.

    OMP_NUM_THREADS=1 python benchmarks/train_tiny_teacher.py --which both

trains, with the deterministic 8,192-token BPE that executor.data.get_tokenizer trains on the
shipped corpus (tinyshakespeare), the teacher of examples/tiny-cpu/teacher/config.json on the
training split of tinyshakespeare PLUS the Shakespeare that is not in it
(teacher-corpus/shakespeare-more.txt.xz, 3.5x more text: a teacher has seen more than its
distillation set; benchmarks/prepare_teacher_corpus.py), and a label-only student of
examples/tiny-cpu/student/config.json on the training split of tinyshakespeare alone (the data
a distilled student gets), each with early stopping on the held-out split (the last 5 % of the
tinyshakespeare rows; the same split the executor holds out), and writes

    examples/tiny-cpu/tokenizer/              the tokenizer (tokenizer.json ...)
    examples/tiny-cpu/teacher-ckpt/           model.safetensors (bf16) + config.json + pretrain.json
    examples/tiny-cpu/student-labels-ckpt/    the label-only baseline, same format

`--vocab N` trains on an N-token BPE instead of the configs' vocab_size (the 1,024-token runs in
teacher-ckpt/README.md; use it with `--out DIR` so the shipped files stay untouched).

pretrain.json records the settings, the held-out loss curve and the held-out loss of the SAVED
(bf16) weights, which is what the tests check. The defaults are the shipped settings.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import time
from pathlib import Path

import torch

from executor import data, models, pretrain
from kdplan.models import load_model_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu"
EXTRA = EXAMPLE / "teacher-corpus" / "shakespeare-more.txt.xz"

# the shipped settings, per role (the best of the short sweep recorded in teacher-ckpt/README.md)
SETTINGS = {
    "teacher": dict(steps=2000, lr=1.5e-3, weight_decay=0.1, dropout=0.0, resid_dropout=0.0),
    "student": dict(steps=900, lr=4e-3, weight_decay=0.1, dropout=0.0, resid_dropout=0.0),
}
# held-out evaluation every N steps, and early stopping after P evaluations without improvement
EVAL = {"teacher": dict(eval_every=100, patience=5), "student": dict(eval_every=50, patience=4)}
COMMON = dict(batch=16, seq_len=128, seed=0)


def extra_used(args) -> bool:
    return bool(args.extra_text) and args.extra_text != "none"


def read_text(path: str) -> str:
    p = Path(path)
    return (lzma.decompress(p.read_bytes()) if p.suffix == ".xz" else p.read_bytes()).decode("utf-8")


def train_one(role: str, spec, train, held, args) -> dict:
    hp = dict(SETTINGS[role], **COMMON)
    for k in ("steps", "lr", "weight_decay", "dropout", "resid_dropout"):
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    t0 = time.time()

    def log(step, loss, heldout=None):
        if heldout is not None:
            print(f"{role} step {step + 1:4d}  train {loss:.3f}  held-out {heldout:.3f}  {time.time() - t0:5.0f} s", flush=True)

    ev = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in EVAL[role].items()}
    model = pretrain.train_labels_only(spec, data=train, heldout=held, log=log, **ev, **hp)
    spec_json = spec.model_dump(mode="json")
    spec_json["name"] = f"examples/tiny-cpu/{role}/config.json"  # not this machine's absolute path
    info = {"role": role, "extra_text": (Path(args.extra_text).name if extra_used(args) and role == "teacher" else None),
            "train_rows": int(train.shape[0]), "spec": spec_json, "hyperparameters": hp,
            **ev,
            "train_seconds": round(model.train_seconds, 1), "threads": torch.get_num_threads(),
            "best_step": model.best[0], "heldout_loss_fp32": round(model.best[1], 4),
            "heldout_curve": [(s, round(h, 4)) for s, h in model.evals]}
    dest = Path(args.out) / ("teacher-ckpt" if role == "teacher" else "student-labels-ckpt")
    if dest.exists():
        shutil.rmtree(dest)
    models.save_checkpoint(model.to(torch.bfloat16), dest)
    # the held-out loss of what was saved: bf16 weights, loaded back into an fp32 model
    saved = models.load_checkpoint(models.build_model(spec), dest)
    info["heldout_loss"] = round(pretrain.evaluate(saved, held), 4)
    info["size_bytes"] = (dest / "model.safetensors").stat().st_size
    (dest / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{role}: best step {info['best_step']}, held-out {info['heldout_loss']} nats/token (bf16 saved), "
          f"{info['train_seconds']} s, {info['size_bytes'] / 1e6:.1f} MB -> {dest}", flush=True)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=["teacher", "student", "both"], default="both")
    ap.add_argument("--out", default=str(EXAMPLE), help="where the tokenizer and checkpoints go")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", dest="weight_decay", type=float)
    ap.add_argument("--dropout", type=float, help="embedding + attention-probability dropout")
    ap.add_argument("--resid-dropout", dest="resid_dropout", type=float, help="dropout on the residual branches")
    ap.add_argument("--tie", action="store_true", help="tie the teacher's embeddings (tried: slower to learn)")
    ap.add_argument("--vocab", type=int, help="BPE vocabulary size (default: the example configs' vocab_size)")
    ap.add_argument("--extra-text", default=str(EXTRA),
                    help="also pre-train the TEACHER on this text (.txt or .txt.xz; default: "
                         "teacher-corpus/shakespeare-more.txt.xz, the Shakespeare not in tinyshakespeare; "
                         "'none': tinyshakespeare only); the label-only student and the held-out split stay "
                         "on tinyshakespeare")
    ap.add_argument("--eval-every", type=int, help="default: teacher 100, student 50")
    ap.add_argument("--patience", type=int, help="evaluations without improvement before stopping (teacher 5, student 4)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    specs = {role: load_model_spec(str(EXAMPLE / role)) for role in ("teacher", "student")}
    vocab = args.vocab or specs["teacher"].vocab_size
    if args.vocab is None and specs["student"].vocab_size != vocab:
        raise SystemExit("examples/tiny-cpu: teacher and student configs disagree on vocab_size")
    texts = data.load_texts(None)
    tok = data.get_tokenizer(texts=texts, vocab_size=vocab)  # deterministic: same as the executor trains
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if tok_dir.exists():  # a shipped tokenizer must be the one trained here
        models.check_vocab(data.get_tokenizer(tokenizer_dir=str(tok_dir)), tok)
    else:
        tok.save_pretrained(str(tok_dir))
    rows = data.pack(data.tokenize(texts, tok), COMMON["seq_len"])
    train, held = data.split_heldout(rows)
    print(f"{rows.shape[0]} rows of {COMMON['seq_len']} + 1 tokens: {train.shape[0]} train, {held.shape[0]} held out")
    extra = None
    if extra_used(args) and args.which != "student":  # only the teacher trains on it
        extra = data.pack(data.tokenize([read_text(args.extra_text)], tok), COMMON["seq_len"])
        print(f"teacher also trains on {args.extra_text}: {extra.shape[0]} more rows")
    for role in (["teacher", "student"] if args.which == "both" else [args.which]):
        spec = specs[role].model_copy(update={"vocab_size": vocab})
        if args.tie and role == "teacher":
            spec = spec.model_copy(update={"tied_embeddings": True})
        rows = torch.cat([train, extra]) if role == "teacher" and extra is not None else train
        train_one(role, spec, rows, held, args)


if __name__ == "__main__":
    main()
