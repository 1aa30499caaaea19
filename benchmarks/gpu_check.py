"""The Python parts of benchmarks/gpu_check.sh (the project's device check), one subcommand each:

    python benchmarks/gpu_check.py info                       # [0]: versions, device, imports
    python benchmarks/gpu_check.py layers OUT.json [PROFILE]  # [c]: one block fwd+bwd vs kdplan
    python benchmarks/gpu_check.py numerics OUT.json          # [d]: GPU numerics vs the CPU
    python benchmarks/gpu_check.py profile-line PROFILE.yaml  # [a]: the written profile in one line
    python benchmarks/gpu_check.py report-line REPORT.json    # [b]: a run report in one line

Each prints its one-line result after ``RESULT `` (the shell copies it into summary.txt) and exits
non-zero when a check fails. ``--cpu-smoke`` (GPU_CHECK_CPU_SMOKE=1 in the shell) runs [c] and [d]
at toy sizes on the CPU, so CI (tests/test_gpu_check.py) catches a broken script; it checks the
script, not the GPU. Everything here runs the project's real code (executor.*, kdplan.*), no copies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _short(e: BaseException, n: int = 200) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:n]}"


# ---- [0] ---------------------------------------------------------------------------------------


def cmd_info(a) -> int:
    import torch
    ok = torch.cuda.is_available()
    s = f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available {ok}"
    if ok:
        p = torch.cuda.get_device_properties(0)
        try:
            v = torch.cuda.nccl.version()
            v = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001
            v = f"? ({type(e).__name__})"
        s += f", {torch.cuda.device_count()} x {p.name} {p.total_memory / 2**30:.0f} GiB sm_{p.major}{p.minor}, NCCL {v}"
    imports_ok = True
    for mod in ("transformers", "pydantic", "pulp", "highspy", "safetensors", "pytest"):
        try:
            m = importlib.import_module(mod)
            s += f", {mod} {getattr(m, '__version__', '?')}"
        except Exception as e:  # noqa: BLE001
            s += f", {mod} MISSING ({type(e).__name__})"
            imports_ok = imports_ok and mod in ("pytest",)
    try:
        import executor.train  # noqa: F401  the executor imports
        import kdplan.cli.main  # noqa: F401  the planner imports
        s += ", kdplan+executor import OK"
    except Exception as e:  # noqa: BLE001
        s += f", IMPORT FAILED: {_short(e)}"
        imports_ok = False
    print("RESULT " + s)
    return 0 if imports_ok and (ok or a.cpu_smoke) else 1


# ---- [a] ---------------------------------------------------------------------------------------


def cmd_profile_line(a) -> int:
    """The profile [a] wrote, loaded back (it must be a valid cluster profile), in one line."""
    import yaml

    from kdplan.profiles import load_cluster
    cl = load_cluster(a.profile)
    g, pv = cl.gpu_of_group(0), cl.provenance
    e, link = g.efficiency, cl.groups[0].node.intra_node
    raw = yaml.safe_load(Path(a.profile).read_text())
    print("RESULT " + (
        f"provenance: {pv.kind}, {pv.date}, {pv.device}, torch {pv.torch_version}, command '{pv.command}'; "
        f"notes: {pv.notes}; peaks bf16 {g.peak.bf16_tflops} / fp32 {g.peak.fp32_tflops} TFLOP/s "
        f"({'datasheet' if 'datasheet' in g.source else 'measured'}); fitted max_fraction {e.max_fraction}, "
        f"half_saturation {e.half_saturation_gflop} GFLOP, attention {e.attention_fraction}, elementwise "
        f"{e.elementwise_bandwidth_fraction} of the memory bandwidth (older profiles: +{e.elementwise_overhead_fraction}); memory {g.memory_bandwidth_gb_per_s} GB/s; loss bandwidth fraction "
        f"{cl.overheads.loss_bytes_per_s_fraction}; top-k passes {g.topk_passes}; intra-node link "
        f"{link.bandwidth_gb_per_s} GB/s ({link.source[:80]}); placeholder {cl.placeholder}; "
        f"{len(raw.get('gpus') or {})} inline GPU spec(s)"))
    return 0


# ---- [b] ---------------------------------------------------------------------------------------


def report_line(r: dict) -> str:
    """A run report (kdplan.schema.report.RunReport as JSON) in one line: measured vs predicted."""
    m, p = r["measured"], r.get("predicted") or {}
    ps = p.get("step_time_s") or 0.0
    s = (f"measured {m['step_time_s'] * 1e3:.1f} ms/step vs predicted {ps * 1e3:.1f} ms"
         + (f" (x{m['step_time_s'] / ps:.2f})" if ps else "")
         + f"; tokens/s {m['tokens_per_s']:.0f} vs {p.get('tokens_per_s', 0):.0f}"
         + f"; peak memory {m['peak_memory_gib']:.3f} vs {p.get('memory_per_gpu_gib', 0):.3f} GiB"
         + f"; bytes/step {sum((m.get('bytes_per_step') or {}).values()):.3g} vs {p.get('comm_bytes_per_step', 0):.3g}")
    lo = m.get("loss") or []
    if lo:
        s += f"; loss {lo[0]['total']:.3f} -> {lo[-1]['total']:.3f} (kd {lo[-1].get('kd') or 0:.3f}, ce {lo[-1]['ce']:.3f})"
    return s + f"; {r['world_size']} x {r['device']}, torch {r.get('torch_version', '?')}, {r['steps']} steps"


def cmd_report_line(a) -> int:
    print("RESULT " + report_line(json.loads(Path(a.report).read_text())))
    return 0


# ---- [c] ---------------------------------------------------------------------------------------

LAYER_MODELS = ("gpt-1.3b", "gpt-13b", "llama-3-8b")


def cmd_layers(a) -> int:
    """One transformer block as the executor builds it (executor.models.build_model of a one-layer
    copy of the spec: plain or gated MLP as the spec says), forward and forward+backward, timed
    with CUDA events over several repetitions, in
    pure bf16 and as fp32 weights under bf16 autocast; next to kdplan.cost.compute.layer_time
    (backward = 2 x forward) with the shipped h200 profile and, when given, [a]'s profile."""
    import torch
    from executor.bench.run import elapsed_s
    from executor.models import build_model
    from kdplan.cost.compute import layer_time
    from kdplan.models import load_model_spec
    from kdplan.profiles import load_cluster

    smoke = a.cpu_smoke
    dev = torch.device("cpu" if smoke else "cuda")
    S = 64 if smoke else 2048
    batches = [1] if smoke else [int(b) for b in a.batches.split()]
    cl = load_cluster("dgx-h200")
    gpus = {"shipped h200": cl.gpu_of_group(0)}
    fused = cl.overheads.fused_attention
    if a.profile:
        try:
            gpus["profile [a]"] = load_cluster(a.profile).gpu_of_group(0)
        except Exception as e:  # noqa: BLE001
            print(f"profile {a.profile} does not load ({_short(e)}); predicting with the shipped h200 only")

    def timer(fn, reps):
        for _ in range(2):  # warm-up (cuBLAS/SDPA kernel choice, allocator)
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return elapsed_s(fn, reps, cuda=dev.type == "cuda") / reps  # the profiler's own timer

    rows, line, failed = [], [], False
    for name in LAYER_MODELS:
        try:
            spec = load_model_spec(name)
            if smoke:
                spec = spec.model_copy(update=dict(hidden_size=128, num_heads=4, num_kv_heads=4, ffn_hidden_size=256))
            one_layer = spec.model_copy(update=dict(num_layers=1, vocab_size=256, tied_embeddings=False))
            parts = []
            for b in batches:
                res = {"model": name, "micro_batch": b, "seq_len": S, "hidden": spec.hidden_size,
                       "ffn": spec.ffn_hidden_size, "gated_mlp_preset": spec.gated_mlp, "device": str(dev)}
                for mode in ("bf16", "fp32+autocast"):
                    torch.manual_seed(0)
                    wdt = torch.bfloat16 if mode == "bf16" else torch.float32
                    built = build_model(one_layer, device=dev, dtype=wdt)
                    layer, rope = built.model.layers[0], built.model.rotary_emb
                    x = torch.randn(b, S, spec.hidden_size, device=dev, dtype=wdt, requires_grad=True)
                    dy = torch.randn_like(x)
                    pos = torch.arange(S, device=dev).unsqueeze(0)
                    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=(mode != "bf16"))
                    with ac:
                        pe = rope(x, pos)
                    params = list(layer.parameters())

                    def fwd():
                        with ac:
                            y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
                        return y[0] if isinstance(y, tuple) else y

                    def fwd_nograd():
                        with torch.no_grad():
                            fwd()

                    def fwdbwd():
                        for p in params:
                            p.grad = None
                        x.grad = None
                        fwd().backward(dy)

                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    reps = 2 if smoke else (10 if spec.hidden_size < 4096 else 5)
                    res[f"{mode} fwd s"] = timer(fwd_nograd, reps)
                    res[f"{mode} fwd+bwd s"] = timer(fwdbwd, reps)
                    if dev.type == "cuda":
                        res[f"{mode} peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
                    del layer, built, x, dy, pe
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                for tag, gpu in gpus.items():
                    lt = layer_time(spec, gpu, "bf16", b=b, s=S, tp=1, fused_attention=fused)
                    res[f"pred {tag} fwd+bwd s"] = lt.forward_s + lt.backward_s
                    res[f"pred {tag} fwd s"] = lt.forward_s
                rows.append(res)
                pg = res["pred shipped h200 fwd+bwd s"]
                m16, mex = res["bf16 fwd+bwd s"], res["fp32+autocast fwd+bwd s"]
                s = (f"b{b} bf16 {m16 * 1e3:.2f} ms (fwd {res['bf16 fwd s'] * 1e3:.2f}), fp32+autocast {mex * 1e3:.2f} ms "
                     f"(x{mex / m16:.2f}) vs layer_time {pg * 1e3:.2f} ms (meas/pred {m16 / pg:.2f}, "
                     f"{'gated' if spec.gated_mlp else 'plain'} MLP)")
                if "profile [a]" in gpus:
                    s += f", {res['pred profile [a] fwd+bwd s'] * 1e3:.2f} ms with [a]'s profile"
                parts.append(s)
            line.append(f"{name} (h {spec.hidden_size}, s {S}): " + "; ".join(parts))
        except Exception as e:  # noqa: BLE001  one model failing does not hide the others
            failed = True
            line.append(f"{name}: FAIL {_short(e)}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("RESULT " + " | ".join(line))
    return 1 if failed else 0


# ---- [d] ---------------------------------------------------------------------------------------


class _Bucket:
    """Stands for dist.GradBucket when calling a DDP comm hook directly."""

    def __init__(self, t):
        self.t = t

    def buffer(self):
        return self.t

    def index(self):
        return 0


def _kd_loss_check(dev, smoke):
    """kd_loss on the device vs on the CPU (bf16 inputs, fp32 math), dense and top-k targets, and
    the host synchronisations of one forward+backward (torch.cuda.set_sync_debug_mode)."""
    import torch

    from executor.kd.compression import decode, encode
    from executor.kd.losses import TeacherTarget, kd_loss
    from kdplan.schema.compression import parse_compression

    N, V = (256, 512) if smoke else (4096, 50257)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(N, V, generator=g) * 3).bfloat16()
    t = (torch.randn(N, V, generator=g) * 3).bfloat16()
    lab = torch.randint(0, V, (N,), generator=g)
    lab[::7] = -100  # ignored positions, as padding gives
    out, ok = [], True
    for kind in ("dense", "topk:64:8"):
        def run(d, count_syncs=False):
            x = s.to(d, copy=True).requires_grad_(True)
            tgt = TeacherTarget.dense(t.to(d)) if kind == "dense" else \
                decode(encode(t.to(d), parse_compression(kind), temperature=2.0), V)
            labels = lab.to(d)
            n = 0
            if count_syncs:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    r = kd_loss(x, tgt, labels, temperature=2.0, alpha=0.5)
                    r.total_sum.backward()
                n = sum("synchroniz" in str(m.message) for m in w)
            finally:
                if count_syncs:
                    torch.cuda.set_sync_debug_mode(0)
            return torch.stack([r.total_sum, r.kd_sum, r.ce_sum]).double().cpu(), x.grad.float().cpu(), n
        ref, gref, _ = run(torch.device("cpu"))
        got, ggot, syncs = run(dev, count_syncs=dev.type == "cuda")
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-9)).max().item()
        grel = ((ggot - gref).norm() / gref.norm()).item()
        good = rel <= 1e-3 and grel <= 1e-2 and syncs == 0
        ok &= good
        out.append(f"{kind} sums rel {rel:.1e}, grad rel {grel:.1e}, {syncs} host syncs in one fwd+bwd of {N} tokens "
                   f"({-(-N // 1024)} chunks){'' if good else ' FAIL'}")
    return ok, "; ".join(out)


def _topk_check(dev, smoke):
    """The top-k codec on the device vs the CPU: does the device pick a true top-k (ties may be
    ordered differently: the sorted true log-probs of its ids must equal the CPU's top-k values),
    decoded values, and the transient memory of encode / decode (bounded by the chunking)."""
    import torch
    import torch.nn.functional as F

    from executor.kd.compression import decode, encode
    from kdplan.schema.compression import parse_compression

    N, V, k = (128, 512, 16) if smoke else (16384, 50257, 1024)  # one seed-plan micro-batch (8 x 2048)
    R = min(N, 256)  # rows compared with the CPU codec
    T = 1.0
    gen = torch.Generator(device=dev).manual_seed(1)
    x = (torch.randn(N, V, device=dev, generator=gen) * 4).bfloat16()
    c = parse_compression(f"topk:{k}")
    xr = x[:R].cpu()
    ref = decode(encode(xr, c, temperature=T), V)
    mem = ""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
    p = encode(x, c, temperature=T)
    enc_gib = dec_gib = 0.0
    if dev.type == "cuda":
        e1.record()
        torch.cuda.synchronize()
        enc_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        mem = (f", encode {e0.elapsed_time(e1):.1f} ms, transient +{enc_gib:.2f} GiB over the "
               f"{x.numel() * 2 / 2**30:.2f} GiB of bf16 logits")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    got = decode(p, V)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        dec_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        mem += f", decode transient +{dec_gib:.2f} GiB"
    gi, gl = got.indices[:R].cpu(), got.logprobs[:R].float().cpu()
    same_pos = (gi == ref.indices).float().mean().item()
    same_set = sum(torch.equal(a.sort().values, b.sort().values) for a, b in zip(gi, ref.indices)) / R
    lp = F.log_softmax(xr.float() / T, dim=-1)  # the CPU's exact log-probs of the same rows
    picked = lp.gather(1, gi).sort(dim=1, descending=True).values
    best = lp.topk(k, dim=1).values
    true_topk = (picked - best).abs().max().item()
    dec = (gl.sort(dim=1, descending=True).values - ref.logprobs.float().sort(dim=1, descending=True).values).abs().max().item()
    ok = true_topk <= 1e-5 and dec <= 2e-2 and enc_gib < 1.0 and dec_gib < 1.0
    verdict = ("a true top-k on every row (differences are tie order only)" if true_topk <= 1e-5 else
               "NOT a true top-k: a real selection bug")
    return ok, (f"topk:{k} at {N}x{V}: ids equal position by position {same_pos:.4f}, as sets {same_set:.4f}; "
                f"sorted true log-probs of the device's ids vs the CPU top-k: max diff {true_topk:.1e} -> {verdict}; "
                f"decoded values (sorted) max diff {dec:.1e}{mem}")


def _quant_check(dev, smoke):
    """Teacher weight fake-quantization (executor.quant) on the device vs the CPU: at most one
    quantization step apart (rounding at midpoints may differ); the fraction that differs is reported."""
    import torch

    from executor.quant import FP8_MAX, INT8_MAX, fake_quantize
    w = torch.randn(256 if smoke else 1024, 4096, generator=torch.Generator().manual_seed(2))
    out, ok = [], True
    for fmt in ("int8", "fp8"):
        a, b = fake_quantize(w, fmt), fake_quantize(w.to(dev), fmt).cpu()
        diff = (a - b).abs()
        step = w.abs().amax(1, keepdim=True) / (INT8_MAX if fmt == "int8" else FP8_MAX)
        # one step: int8's scale; fp8: the e4m3 spacing at the value (2^(e-3) of the scaled value)
        ulp = step if fmt == "int8" else step * torch.exp2(torch.floor(torch.log2((a.abs() / step).clamp_min(2**-6))) - 3)
        frac = (diff > 0).float().mean().item()
        good = bool((diff <= ulp * 1.001 + 1e-12).all())  # the fraction is reported, not judged
        ok &= good
        out.append(f"{fmt} max |dev-cpu| {diff.max().item():.1e} on {frac:.1e} of the weights"
                   f"{' (all within one quantization step)' if good else ' FAIL: more than one step apart'}")
    return ok, ", ".join(out)


def _teacher_load_check(dev, smoke):
    """The shipped tiny teacher checkpoint loaded on the device in bf16 (executor.models.load_checkpoint)
    equals the CPU load: same bf16 weights, no fp32 parameter."""
    import torch

    from executor.models import build_model, load_checkpoint
    from kdplan.models import load_model_spec
    ex = ROOT / "examples" / "tiny-cpu"
    spec = load_model_spec(str(ex / "teacher" / "config.json"))
    m_dev = load_checkpoint(build_model(spec, dtype=torch.bfloat16), ex / "teacher-ckpt", device=dev)
    m_cpu = load_checkpoint(build_model(spec, dtype=torch.bfloat16), ex / "teacher-ckpt", device="cpu")
    cpu = dict(m_cpu.named_parameters())
    dtypes = {p.dtype for p in m_dev.parameters()}
    same = all(torch.equal(p.detach().cpu(), cpu[n].detach()) for n, p in m_dev.named_parameters())
    devs = {p.device.type for p in m_dev.parameters()}
    ok = same and dtypes == {torch.bfloat16} and devs == {dev.type}
    return ok, f"tiny teacher on {sorted(devs)} in {sorted(str(d) for d in dtypes)}: {'equal to' if same else 'DIFFERS from'} the CPU load"


def _int8_hook_check(dev, smoke):
    """The 8-bit gradient hook on a 1-rank NCCL (gloo on CPU) group: every bucket decodes to its own
    quantized value (the draft saw 4 of 8 wrong: the decode read the all-gather before NCCL wrote it)."""
    import torch

    from executor.kd.grad_hooks import Int8HookState, int8_hook, quantize_int8
    n = 1 << (12 if smoke else 26)
    bad, trials = 0, 8
    for i in range(trials):
        x = torch.randn(n, device=dev) * (i + 1)
        q, s = quantize_int8(x)
        expect = (q.float() * s).clone()
        got = int8_hook(Int8HookState(process_group=None, error_feedback=False), _Bucket(x.clone())).wait()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        bad += not torch.allclose(got, expect, rtol=0, atol=float(s) * 1e-3)
    kind = "NCCL" if dev.type == "cuda" else "gloo"
    return bad == 0, f"{bad}/{trials} buckets averaged wrong on a 1-rank {kind} group ({n} elements each)"


def cmd_numerics(a) -> int:
    import torch
    import torch.distributed as dist

    dev = torch.device("cpu" if a.cpu_smoke else "cuda")
    checks = [("kd_loss device vs cpu", _kd_loss_check), ("top-k codec", _topk_check),
              ("teacher fake-quant", _quant_check), ("teacher checkpoint load", _teacher_load_check),
              ("int8 grad hook", _int8_hook_check)]
    res, lines, failed = {}, [], []
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            if name == "int8 grad hook" and not dist.is_initialized():
                if dev.type == "cuda":
                    torch.cuda.set_device(0)
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(),
                                        rank=0, world_size=1)
            ok, text = fn(dev, a.cpu_smoke)
        except Exception as e:  # noqa: BLE001  one check failing does not hide the others
            ok, text = False, f"raised {_short(e)}"
        res[name] = {"ok": ok, "result": text, "seconds": round(time.perf_counter() - t0, 2)}
        lines.append(f"{name}: {'OK' if ok else 'FAIL'} {text}")
        if not ok:
            failed.append(name)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.destroy_process_group()
    Path(a.out).write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "checks": res}, indent=1) + "\n")
    print("RESULT " + " | ".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (checks the script, not a GPU)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    p = sub.add_parser("layers")
    p.add_argument("out")
    p.add_argument("profile", nargs="?", default="")
    p.add_argument("--batches", default="1 8")
    p = sub.add_parser("numerics")
    p.add_argument("out")
    p = sub.add_parser("profile-line")
    p.add_argument("profile")
    p = sub.add_parser("report-line")
    p.add_argument("report")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return {"info": cmd_info, "layers": cmd_layers, "numerics": cmd_numerics, "profile-line": cmd_profile_line,
            "report-line": cmd_report_line}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
