"""Fidelity cost of a quantized teacher (--teacher-precision fp8|int8), measured on this machine.

Loads the tiny example's shipped teacher (examples/tiny-cpu/teacher-ckpt), quantizes its block
Linear weights the way the executor does for a plan whose teacher runs in fp8 / int8
(executor/quant.py: per-output-channel absmax, weight-only, dequantized to fp32), and compares
its next-token distributions with the exact teacher's on the held-out split the executor holds
out (the same text and seq_len as tests/test_teacher_quality.py):

- KL(exact ‖ quantized) at T = 1 and T = 2, nats per token: what the student is taught differently;
- top-1 agreement: how often both teachers predict the same next token;
- held-out cross-entropy of each teacher (nats per token).

    OMP_NUM_THREADS=1 python benchmarks/teacher_precision_quality.py        # ~10-30 s of one core

Weight-only fake quantization is what the executor runs (no fp8/int8 kernels on CPU); an fp8 / int8
GEMM on a GPU also quantizes activations, so its error is at least this. A 4 x 256 teacher is far
smaller than the 13B-70B teachers the planner quantizes, whose per-channel weight distributions
differ: read these numbers as this model's, not as a general law.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from executor import data, models  # noqa: E402
from executor.quant import weight_transform  # noqa: E402
from kdplan.models import load_model_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-cpu"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(EXAMPLE / "teacher-ckpt"))
    ap.add_argument("--config", default=str(EXAMPLE / "teacher"))
    ap.add_argument("--tokenizer", default=str(EXAMPLE / "tokenizer"))
    ap.add_argument("--max-rows", type=int, default=256, help="held-out rows evaluated (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = load_model_spec(args.config)
    ckpt = Path(args.checkpoint)
    meta = ckpt / "pretrain.json"
    seq_len = json.loads(meta.read_text())["hyperparameters"]["seq_len"] if meta.exists() else 128
    tok = data.get_tokenizer(tokenizer_dir=args.tokenizer)
    _, held = data.split_heldout(data.pack(data.tokenize(data.load_texts(None), tok), seq_len))
    if args.max_rows:
        held = held[: args.max_rows]
    teachers = {fmt: models.load_checkpoint(models.build_model(spec), ckpt, transform=weight_transform(fmt)).eval()
                for fmt in ("bf16", "int8", "fp8")}
    V = spec.vocab_size
    n_tok = 0
    ce = {f: 0.0 for f in teachers}
    kl1 = {f: 0.0 for f in teachers}
    kl2 = {f: 0.0 for f in teachers}
    agree = {f: 0 for f in teachers}
    for a in range(0, held.shape[0], 16):
        r = held[a: a + 16]
        x, y = r[:, :-1], r[:, 1:].reshape(-1)
        logits = {f: m(input_ids=x).logits.reshape(-1, V).float() for f, m in teachers.items()}
        ref = logits["bf16"]
        for f, z in logits.items():
            ce[f] += F.cross_entropy(z, y, reduction="sum").item()
            for T, acc in ((1.0, kl1), (2.0, kl2)):
                lp, lq = F.log_softmax(ref / T, -1), F.log_softmax(z / T, -1)
                acc[f] += (lp.exp() * (lp - lq)).sum().item()
            agree[f] += int((z.argmax(-1) == ref.argmax(-1)).sum())
        n_tok += y.numel()
    print(f"teacher {Path(args.config).name} ({spec.num_params() / 1e6:.1f} M params) from {ckpt}; "
          f"{held.shape[0]} held-out rows x {seq_len} tokens = {n_tok:,} tokens; {time.perf_counter() - t0:.0f} s")
    print(f"{'teacher':<16} {'held-out CE':>12} {'KL(exact‖q) T=1':>16} {'T=2':>10} {'top-1 agree':>12}")
    for f in teachers:
        name = "exact (bf16)" if f == "bf16" else f"{f} (weights)"
        print(f"{name:<16} {ce[f] / n_tok:>12.4f} {kl1[f] / n_tok:>16.2e} {kl2[f] / n_tok:>10.2e} "
              f"{agree[f] / n_tok:>11.2%}")


if __name__ == "__main__":
    main()
