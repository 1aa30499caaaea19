"""Measured speedup of a plan over the baselines on this machine, and bytes saved by compression.

    python benchmarks/executor_speedup.py [--job examples/tiny-cpu/job.toml] [--steps 12] [--out runs/bench]

1. ``kdplan plan JOB`` -> plan.json, then ``kdplan run`` of the plan and of ``--baseline naive-dp``
   and ``--baseline single`` (and ``mirror`` with --mirror), same models, data and steps, one after the
   other on this machine. Speedup = baseline median step time / plan median step time.
2. Teacher-output bytes per token for each compression, measured as the size of real payloads
   (executor.kd.compression.encode on the pre-trained teacher's logits for held-out text), and
   the bytes per step a disaggregated run of the same plan counted at its isend call sites.
Numbers are from a shared 2-core VM: noisy (about +-30%), and they say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPRESSIONS = ("dense", "topk:256", "topk:64", "topk:64:8", "topk:64:4", "topk:16:4")


def kdplan(*args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", KDPLAN_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "kdplan.cli.main", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kdplan {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def run(plan: Path, out: Path, steps: int, baseline: str | None, runs_dir: str | None) -> dict:
    report = out / f"report-{baseline or 'plan'}.json"
    kdplan("run", plan, "--steps", steps, "--report", report, *(["--baseline", baseline] if baseline else []),
           *(["--output-dir", runs_dir] if runs_dir else []))
    return json.loads(report.read_text())


def payload_bytes(plan: dict, cache: Path) -> dict[str, float]:
    """Bytes per token of real payloads for each compression (teacher logits on held-out rows)."""
    import torch

    from executor.data import get_tokenizer, load_texts, pack, split_heldout, tokenize
    from executor.kd.compression import encode
    from executor.models import build_model, load_checkpoint
    from kdplan.schema import ModelSpec
    from kdplan.schema.compression import parse_compression

    spec = ModelSpec.model_validate(plan["teacher"]["model"])
    ckpt = next(cache.glob("teacher-*"), None)
    if ckpt is None:
        return {}
    texts = load_texts(plan["run"]["data"])
    tok = get_tokenizer(tokenizer_dir=plan["run"]["tokenizer"], texts=texts, vocab_size=spec.vocab_size,
                        cache_dir=str(cache))
    _, held = split_heldout(pack(tokenize(texts, tok), plan["job"]["seq_len"]))
    model = load_checkpoint(build_model(spec), ckpt).eval()
    with torch.no_grad():
        logits = model(input_ids=held[:4, :-1]).logits.reshape(-1, spec.vocab_size)
    return {c: encode(logits, parse_compression(c), temperature=plan["kd"]["temperature"]).nbytes / logits.shape[0]
            for c in COMPRESSIONS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="examples/tiny-cpu/job.toml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--mirror", action="store_true", help="also run the mirror baseline")
    ap.add_argument("--runs-dir", default=None, help="override the plan's run.output_dir (caches: tokenizer, teacher)")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    kdplan("plan", args.job, "-o", plan_path)
    plan = json.loads(plan_path.read_text())
    reports = {b: run(plan_path, out, args.steps, b, args.runs_dir) for b in (None, "naive-dp", "single", *(["mirror"] if args.mirror else []))}
    base = reports[None]["measured"]
    print(f"\nplan: {reports[None]['layout_summary']}  ({args.steps} steps, median after warm-up, this machine)")
    print(f"{'run':12s}{'procs':>6s}{'step (s)':>10s}{'speedup':>9s}{'tokens/s':>10s}{'bytes/step':>13s}  by kind")
    for name, r in reports.items():
        m = r["measured"]
        speed = m["step_time_s"] and m["step_time_s"] / base["step_time_s"]
        kinds = ", ".join(f"{k} {v:.3g}" for k, v in sorted(m["bytes_per_step"].items()))
        print(f"{name or 'plan':12s}{r['world_size']:6d}{m['step_time_s']:10.3f}{1 / speed if speed else 0:9.2f}x"
              f"{m['tokens_per_s']:10.0f}{sum(m['bytes_per_step'].values()):13.3g}  {kinds}")
    for name in ("naive-dp", "single", "mirror"):
        if name in reports:
            print(f"speedup of the plan over {name}: "
                  f"{reports[name]['measured']['step_time_s'] / base['step_time_s']:.2f}x (measured)")
    sizes = payload_bytes(plan, ROOT / (args.runs_dir or plan["run"]["output_dir"]) / "cache")
    if sizes:
        dense = sizes["dense"]
        print("\nteacher outputs per token (real payloads of the pre-trained teacher, V ="
              f" {plan['teacher']['model']['vocab_size']}):")
        for c, b in sizes.items():
            print(f"  {c:12s}{b:10.1f} B/token   saves {100 * (1 - b / dense):5.1f}% of dense (bf16)")


if __name__ == "__main__":
    main()
