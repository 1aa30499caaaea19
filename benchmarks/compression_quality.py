"""Quality cost of each teacher-output compression, measured on this machine (one process).

Distils the tiny student (examples/tiny-cpu/student) from the shipped tiny teacher with dense,
top-k and sampled teacher outputs, plus a label-only student, over ``--seeds`` seeds. Within a
seed the arms are paired: same init, same batch order, same teacher outputs (the teacher runs
once per step and its logits go through encode -> decode for each compression, with the same
systematic-sampling offsets for every sampled arm); the seed changes the init, the batch order and
the sampling offsets. Per arm it prints bytes per token (measured from the payload, and the
planner's formula), held-out cross-entropy and KL(teacher ‖ student) at T = 1, and the share of
dense KD's gain each keeps, (labels − arm) / (labels − dense), on both, as the mean over seeds
with a 95% t-interval (Student's t, seeds − 1 degrees of freedom; per-seed shares, so the pairing
cancels the seed-to-seed spread that all arms share).

A gradient-fidelity probe screens the formats in seconds (``--probe-only``: train one dense-KD
student for ``--probe-steps`` and stop; otherwise it uses seed 0's dense student): on fixed held-out
batches of that trained student, the cosine and norm
ratio of each format's KD gradient (all parameters) to the dense-KD gradient (sampled formats:
averaged over the batches, one draw each).

    OMP_NUM_THREADS=1 python benchmarks/compression_quality.py --seeds 3 --steps 40      # see README
    OMP_NUM_THREADS=1 python benchmarks/compression_quality.py --steps 2 --seeds 2  # smoke run
    ... --write profiles/fidelity/tiny-cpu.json   # the measured curve the planner's --min-fidelity reads

The last line is ``best format at >=100x fewer bytes: NAME keeps X% of dense-KD gain (95% CI
A-B%), N B/token``, X being the held-out cross-entropy share (KL share printed in the table).

Measured here (2026-12-04, ``--seeds 3 --steps 40``, 16 × 128 tokens per step, T = 1, alpha = 0.5;
2,561 s wall on a loaded 2-core machine), share of dense KD's gain kept on held-out CE [95% CI]:

    format             B/token  x fewer  CE share        KL share        probe cos  |g|/|g_dense|
    topk:64                236     69    42% [-1, 86]    54% [30, 78]    0.777      1.519
    sample:64              104    158    95% [82, 108]   96% [87, 104]   0.999      1.005
    topk:8+sample:48       107    153    96% [94, 98]    96% [93, 98]    0.999      1.000
    best format at >=100x fewer bytes: topk:8+sample:48 keeps 96% of dense-KD gain (95% CI 94-98%), 107 B/token

(labels only 5.932, dense 5.788 held-out CE; earlier, one seed of 150 steps: labels 5.359, dense
5.182, topk:64 5.251, topk:64:8 5.265, topk:16:4 5.342.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
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
LABELS = "labels only"
DEFAULT_FORMATS = "dense,topk:64,sample:64,topk:8+sample:48"
# Student's t 0.975 quantiles by degrees of freedom (95% two-sided), beyond 30: 1.96.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval; a single value has an infinite interval."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    df = n - 1
    t = T975.get(df) or (T975[max(d for d in T975 if d <= df)] if df <= 30 else 1.96)
    half = t * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressions", default=DEFAULT_FORMATS, help="comma-separated; dense is always added")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--probe-steps", type=int, default=40, help="dense-KD steps of the probe's student with --probe-only "
                    "(otherwise the probe uses seed 0's dense student, --steps)")
    ap.add_argument("--probe-batches", type=int, default=4)
    ap.add_argument("--probe-only", action="store_true", help="screen the formats with the gradient probe and stop")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--teacher-ckpt", default=str(EXAMPLE / "teacher-ckpt"))
    ap.add_argument("--write", default=None, help="write the measured fidelity curve (JSON with provenance) here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        sys.exit("compression_quality: --seeds and --steps must be >= 1")
    torch.set_num_threads(1)

    formats = [f.strip() for f in args.compressions.split(",") if f.strip()]
    if "dense" not in formats:
        formats.insert(0, "dense")
    comps = {f: parse_compression(f) for f in formats}  # refuses a bad spelling before any work
    texts = data.load_texts(None)
    tok = data.get_tokenizer(tokenizer_dir=str(EXAMPLE / "tokenizer"))
    rows = data.pack(data.tokenize(texts, tok), pretrain.RECOMMENDED["seq_len"])
    train, held = data.split_heldout(rows)
    t_spec, s_spec = load_model_spec(str(EXAMPLE / "teacher")), load_model_spec(str(EXAMPLE / "student"))
    teacher = models.load_checkpoint(models.build_model(t_spec), Path(args.teacher_ckpt)).eval()
    V = s_spec.vocab_size
    dense_bpt = comps["dense"].bytes_per_token(V)
    t0 = time.perf_counter()

    # ---- paired training arms, per seed (the probe uses seed 0's dense student) -------------------
    results: list[dict] = []  # per seed: name -> (ce, kl)
    nbytes = {f: 0 for f in formats}
    teacher_ce, probe = None, None
    for seed in range(args.seeds):
        students, nb = train_arms(teacher, {} if args.probe_only else comps, train, V, args, seed=seed,
                                  steps=args.probe_steps if args.probe_only else args.steps,
                                  labels=not args.probe_only, dense=True)
        if probe is None:
            probe = gradient_probe(students["dense"], teacher, comps, held, V, args)
            print(f"gradient probe: student after {args.probe_steps if args.probe_only else args.steps} dense-KD steps, "
                  f"{args.probe_batches} held-out batches of {args.batch} × 128 ({time.perf_counter() - t0:.0f} s)")
            print(f"{'format':<20} {'B/token':>8} {'x fewer':>8} {'cos':>7} {'|g|/|g_dense|':>14}")
            for f in formats:
                bpt = comps[f].bytes_per_token(V)
                print(f"{f:<20} {bpt:>8.1f} {dense_bpt / bpt:>8.1f} {probe[f][0]:>7.3f} {probe[f][1]:>14.3f}", flush=True)
            if args.probe_only:
                return
        for f in formats:
            nbytes[f] += nb[f]
        res = evaluate_all(teacher, students, held, V)
        teacher_ce = res.pop("teacher")[0]
        results.append(res)
        print(f"seed {seed}: " + ", ".join(f"{n} {ce:.3f}" for n, (ce, _) in res.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    tokens = args.seeds * args.steps * args.batch * 128
    print(f"\n{args.seeds} seeds × {args.steps} steps × {args.batch} × 128 tokens, T = {args.temperature}, "
          f"alpha = {args.alpha}; teacher held-out CE {teacher_ce:.3f}; {time.perf_counter() - t0:.0f} s")
    print(f"{'teacher outputs':<20} {'B/token':>8} {'planner':>8} {'x fewer':>8} {'held-out CE':>11} {'KL(t‖s)':>8} "
          f"{'CE share [95% CI]':>24} {'KL share [95% CI]':>24}")
    lab_ce = sum(r[LABELS][0] for r in results) / len(results)
    lab_kl = sum(r[LABELS][1] for r in results) / len(results)
    print(f"{LABELS:<20} {0:>8.1f} {0:>8.1f} {'':>8} {lab_ce:>11.3f} {lab_kl:>8.3f}")
    curve = {}
    for f in formats:
        ce = sum(r[f][0] for r in results) / len(results)
        kl = sum(r[f][1] for r in results) / len(results)
        share_ce = t_interval([(r[LABELS][0] - r[f][0]) / (r[LABELS][0] - r["dense"][0]) for r in results])
        share_kl = t_interval([(r[LABELS][1] - r[f][1]) / (r[LABELS][1] - r["dense"][1]) for r in results])
        measured, planned = nbytes[f] / tokens, comps[f].bytes_per_token(V)
        print(f"{f:<20} {measured:>8.1f} {planned:>8.1f} {dense_bpt / planned:>8.1f} {ce:>11.3f} {kl:>8.3f} "
              f"{_pct(share_ce):>24} {_pct(share_kl):>24}")
        curve[str(comps[f])] = {
            "bytes_per_token": planned, "measured_bytes_per_token": measured,
            "ce_share": _tri(share_ce), "kl_share": _tri(share_kl),
            "fidelity": 1.0 if f == "dense" else min(share_ce[1], share_kl[1]),
            "probe_cosine": probe[f][0], "probe_norm_ratio": probe[f][1],
        }
    if args.write:
        write_curve(Path(args.write), curve, args, teacher_ce=teacher_ce, V=V)
        print(f"wrote {args.write}")
    small = [f for f in formats if comps[f].bytes_per_token(V) * 100 <= dense_bpt]
    if not small:
        print("best format at >=100x fewer bytes: none measured")
        return
    best = max(small, key=lambda f: curve[str(comps[f])]["ce_share"]["low"])
    s = curve[str(comps[best])]["ce_share"]
    print(f"best format at >=100x fewer bytes: {best} keeps {100 * s['mean']:.0f}% of dense-KD gain "
          f"(95% CI {100 * s['low']:.0f}-{100 * s['high']:.0f}%), {comps[best].bytes_per_token(V):.0f} B/token")


def _pct(x: tuple[float, float, float]) -> str:
    m, lo, hi = x
    return f"{100 * m:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _tri(x: tuple[float, float, float]) -> dict:
    return {"mean": x[0], "low": x[1], "high": x[2]}


def write_curve(path: Path, curve: dict, args, *, teacher_ce: float, V: int) -> None:
    """The measured fidelity per format, with provenance (read by the planner's --min-fidelity:
    ``fidelity`` is the lower end of the 95% interval of the share of dense KD's gain kept, the
    smaller of the held-out CE and KL shares; dense is 1 by definition)."""
    doc = {
        "provenance": {
            "kind": "measured", "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/compression_quality.py " + " ".join(sys.argv[1:]),
            "device": f"cpu ({platform.machine()}, 1 thread)", "torch_version": torch.__version__,
            "teacher": str(Path(args.teacher_ckpt).relative_to(ROOT)) if Path(args.teacher_ckpt).is_relative_to(ROOT) else args.teacher_ckpt,
            "student": "examples/tiny-cpu/student", "vocab_size": V, "teacher_heldout_ce": teacher_ce,
            "seeds": args.seeds, "steps": args.steps, "batch": args.batch, "seq_len": 128,
            "temperature": args.temperature, "alpha": args.alpha,
            "fidelity": "lower end of the 95% t-interval over seeds of the share of dense KD's gain kept, "
                        "the smaller of held-out CE and KL(teacher||student)",
        },
        "formats": curve,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def train_arms(teacher, comps: dict, train, V: int, args, *, seed: int, steps: int, labels: bool = False,
               dense: bool = False):
    """Paired students (one per format, plus label-only / dense if asked): same init and batches;
    returns ({name: student}, {name: payload bytes})."""
    if dense:
        comps = {"dense": parse_compression("dense"), **comps}
    names = ([LABELS] if labels else []) + list(comps)
    students, opts = {}, {}
    for name in names:
        m = models.materialize(models.build_model(load_model_spec(str(EXAMPLE / "student"))), seed=1 + 1000 * seed)
        students[name] = m.train()
        opts[name] = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    nbytes = {n: 0 for n in comps}
    batches = data.Batches(train, global_batch=args.batch, seed=2 + 1000 * seed)
    gen = torch.Generator().manual_seed(3 + 1000 * seed)  # the sampling offsets of this seed
    for step in range(steps):
        rows_b = next(batches)
        x, y = rows_b[:, :-1], rows_b[:, 1:].reshape(-1)
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.reshape(-1, V)
        offsets = torch.rand(t_logits.shape[0], generator=gen, dtype=torch.float64)
        targets = {}
        for name, c in comps.items():
            payload = encode(t_logits, c, temperature=args.temperature, offsets=offsets)
            nbytes[name] += payload.nbytes
            targets[name] = decode(payload)
        lr = pretrain.lr_at(step, steps=steps, lr=args.lr, warmup=max(1, steps // 20))
        for name, m in students.items():
            logits = m(input_ids=x).logits.reshape(-1, V)
            if name == LABELS:
                loss = F.cross_entropy(logits, y)
            else:
                out = kd_loss(logits, targets[name], y, temperature=args.temperature, alpha=args.alpha)
                loss = out.total_sum / out.num_tokens
            for g in opts[name].param_groups:
                g["lr"] = lr
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[name].step()
    return students, nbytes


def gradient_probe(student, teacher, comps: dict, held, V: int, args) -> dict:
    """{format: (cosine, norm ratio)} of the KD gradient (alpha = 1) under each format to the dense
    one, on ``args.probe_batches`` fixed held-out batches, averaged over the batches."""
    student.eval()  # no dropout: the gradients differ by the target alone
    params = [p for p in student.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(12345)
    sums = {f: [0.0, 0.0] for f in comps}
    for b in range(args.probe_batches):
        r = held[b * args.batch:(b + 1) * args.batch]
        x, y = r[:, :-1], r[:, 1:].reshape(-1)
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.reshape(-1, V)
        offsets = torch.rand(t_logits.shape[0], generator=gen, dtype=torch.float64)
        grads = {}
        for f, c in comps.items():
            target = decode(encode(t_logits, c, temperature=args.temperature, offsets=offsets))
            out = kd_loss(student(input_ids=x).logits.reshape(-1, V), target, y, temperature=args.temperature, alpha=1.0)
            g = torch.autograd.grad(out.total_sum / out.num_tokens, params)
            grads[f] = torch.cat([t.reshape(-1) for t in g]).double()
        ref = grads["dense"]
        for f, g in grads.items():
            sums[f][0] += float(F.cosine_similarity(g, ref, dim=0))
            sums[f][1] += float(g.norm() / ref.norm())
    return {f: (c / args.probe_batches, n / args.probe_batches) for f, (c, n) in sums.items()}


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
