"""Rich rendering of problems and plans (shared by plan and inspect). Units everywhere."""

from __future__ import annotations

from pydantic import BaseModel
from rich.markup import escape
from rich.table import Table

from ..problem import Problem
from ..schema import Layout, ModelSpec, Plan
from .common import out


def _gib(x: float) -> str:
    return f"{x:,.1f} GiB"


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.1f} GB"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def _zero_cell(lay) -> str:
    """The student's ZeRO stage, with its shard group when it is hybrid (HSDP)."""
    if lay.shard < lay.dp:
        return f"{lay.zero} (HSDP: {lay.replicas} x {lay.shard})"
    return str(lay.zero)


def _per_token(x: float) -> str:
    return f"{x * 1e6:,.1f} us" if x < 1e-3 else _s(x)


def _ranks(rs: list[int]) -> str:
    """Compress a rank list into ranges: 0-7, 16-23."""
    if not rs:
        return "-"
    parts, start, prev = [], rs[0], rs[0]
    for r in rs[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(parts)


def markup_safe(v):
    """A copy of ``v`` (a plan, or any part of one) whose strings print as they are under rich
    markup: names, reasons and dict keys come from files, and a "[/x]" in one made rich raise
    (kdplan inspect exited 1 on such a plan; found by tests/test_fuzz_fields.py)."""
    if isinstance(v, str):
        return escape(v)
    if isinstance(v, BaseModel):
        return v.model_copy(update={k: markup_safe(getattr(v, k)) for k in type(v).model_fields})
    if isinstance(v, dict):
        return {markup_safe(k): markup_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(markup_safe(x) for x in v)
    return v


def render_problem(p: Problem) -> None:
    t = Table(title="Resolved inputs", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    for role, m in (("teacher", p.teacher), ("student", p.student)):
        m = markup_safe(m)
        if m is None:
            t.add_row(role, "none (plain training)")
        else:
            t.add_row(role, f"{m.name}: {m.num_params() / 1e9:.2f} B params, {m.num_layers} layers x "
                            f"{m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} KV), vocab {m.vocab_size:,}")
    c = markup_safe(p.cluster)
    groups = ", ".join(f"{g.num_nodes} x {g.node.gpus_per_node} {g.node.gpu}" for g in c.groups)
    t.add_row("cluster", f"{c.name}: {c.num_gpus} GPUs ({groups})" + ("  [yellow](placeholder numbers)[/]" if c.placeholder else ""))
    j = p.job
    t.add_row("batch", f"{j.global_batch} sequences x {j.seq_len} tokens = {j.global_batch * j.seq_len:,} tokens/step, {j.precision}")
    kd_row = f"{j.kd.loss}, T={j.kd.temperature}, alpha={j.kd.alpha}"
    if p.teacher is not None:
        kd_row += f", over vocabulary ids [0, {p.kd_vocab_size:,})"
    if p.teacher is not None and p.kd_signal == "sequence":
        kd_row = f"sequence-level (the teacher generates text, prompt ratio {j.kd.prompt_ratio:g})"
    t.add_row("kd", kd_row)
    if p.pins:
        t.add_row("pinned", escape(", ".join(f"{k}={v}" for k, v in p.pins.items())))
    out.print(t)


def expert_layout(model: ModelSpec, lay: Layout) -> str:
    """Where an MoE model's experts live under ``lay``, as the cost model prices it: split over
    ep ranks (expert parallelism, tokens exchanged by all-to-all), or every expert on every rank
    of its dp group (replicated, FSDP-sharded or streamed from host memory)."""
    moe = model.moe
    if moe is None:
        return "- (dense)"
    what = (f"{moe.num_experts} x {model.moe_layers} blocks, top-{moe.experts_per_token}"
            + (f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else ""))
    if lay.ep > 1:
        groups = lay.dp // lay.ep
        where = (f"expert parallel ep={lay.ep}: {moe.num_experts // lay.ep} experts per rank per block, "
                 f"{groups} group{'s' if groups > 1 else ''} of {lay.ep} dp ranks, tokens dispatched and "
                 "combined by all-to-all")
        if lay.offload == "weights":
            where += ", each rank's share streamed from host memory"
    elif lay.offload == "weights":
        where = "streamed from host memory"
    elif lay.zero >= 3 and lay.dp > 1:
        where = (f"sharded over dp={lay.dp} (FSDP, gathered per block)" if lay.shard == lay.dp else
                 f"sharded over groups of {lay.shard} of dp={lay.dp} (HSDP, gathered per block)")
    else:
        where = f"replicated on each of dp={lay.dp}" if lay.dp > 1 else "all on each rank"
    split = f", widths split tp={lay.tp}" if lay.tp > 1 else ""
    pipe = f", {lay.pp} stages" if lay.pp > 1 else ""
    return f"{what}; {where}{split}{pipe}" + ("" if lay.ep > 1 else "; no expert parallelism")


def _layouts(plan: Plan) -> None:
    roles = [(n, r) for n, r in (("teacher", plan.teacher), ("student", plan.student)) if r is not None]
    t = Table(title="Layout per role", title_justify="left")
    t.add_column("")
    for n, _ in roles:
        t.add_column(n)
    rows = {
        "model": lambda n, r: f"{r.model.name} ({r.model.num_params() / 1e9:.1f} B params"
                              + (f", {r.model.active_params() / 1e9:.1f} B active)" if r.model.moe else ")"),
        "GPUs (ranks)": lambda n, r: f"{r.layout.num_gpus} ({_ranks(r.layout.ranks)})",
        "tp x pp x dp": lambda n, r: f"{r.layout.tp} x {r.layout.pp} x {r.layout.dp}"
                                     + (f" x cp {r.layout.cp} (ring attention)" if r.layout.cp > 1 else ""),
        "micro-batch": lambda n, r: f"{r.layout.micro_batch} sequences"
                                    + (" (decoded together)" if n == "teacher" and plan.kd.signal == "sequence" else ""),
        "ZeRO": lambda n, r: (_zero_cell(r.layout) if n == "student"
                              else ("3 (weights sharded over dp)" if r.layout.zero == 3 else "0 (no grads/optimizer)")),
        "recompute": lambda n, r: r.layout.recompute if n == "student" else "- (forward only)",
        "sequence parallel": lambda n, r: "yes" if r.layout.sequence_parallel else "no",
        "virtual stages": lambda n, r: f"{r.layout.virtual_stages} ({r.layout.schedule})",
        "offload": lambda n, r: r.layout.offload,
        "gradients": lambda n, r: ("8-bit" if r.layout.grad_compression == "int8" else "full precision") if n == "student" else "-",
        "forward precision": lambda n, r: (r.layout.forward_precision + (" (quantized weights)" if r.layout.forward_precision != "bf16" else " (exact)"))
        if n == "teacher" else (f"{plan.job.precision} (GEMMs fp8, forward and backward)"
                                if r.layout.train_precision == "fp8" else plan.job.precision),
        "layers per stage": lambda n, r: "/".join(str(s.last_layer - s.first_layer) for s in r.layout.stages) or "-",
    }
    if any(r.model.moe is not None for _, r in roles):
        rows["experts"] = lambda n, r: expert_layout(r.model, r.layout)
    for label, fn in rows.items():
        t.add_row(label, *(fn(n, r) for n, r in roles))
    out.print(t)
    kd = plan.kd
    if kd.signal == "sequence":
        out.print("[bold]KD[/]: sequence-level: the teacher generates the training text once, before training "
                  "(its layout above is its generation layout), and the student trains on it with "
                  "cross-entropy in its own tokenizer", soft_wrap=True)
        if kd.signal_reason:
            out.print(f"[bold]Why sequence-level[/]: {kd.signal_reason}", soft_wrap=True, highlight=False)
        return
    line = f"[bold]KD[/]: {kd.mode}, {kd.placement}; teacher outputs {kd.compression}"
    if plan.teacher is not None:
        vocab = kd.vocab_size or plan.student.model.vocab_size
        bpt = kd.compression.bytes_per_token(vocab)
        line += (f" ({bpt:,.0f} B/token); loss {kd.loss}, T={kd.temperature}, alpha={kd.alpha}; "
                 f"over vocabulary ids [0, {vocab:,})")
    out.print(line)
    if kd.compression_reason:
        out.print(f"[bold]Why {kd.compression}[/]: {kd.compression_reason.split(': ', 1)[-1]}", markup=True, highlight=False)
    if plan.teacher is not None and kd.teacher_precision_reason:
        out.print(f"[bold]Teacher precision {plan.teacher.layout.forward_precision}[/]: {kd.teacher_precision_reason}",
                  markup=True, highlight=False)
    if plan.student.layout.train_precision == "fp8":
        out.print("[bold]Student precision fp8[/]: asked for (--student-precision fp8): Transformer Engine style fp8 "
                  "GEMMs forward and backward, bf16 master weights and optimizer; training numerics change",
                  markup=True, highlight=False)


def _rank_map(plan: Plan, max_rows: int = 16) -> None:
    t = Table(title="Rank map (tp innermost; ranks of each pipeline stage)", title_justify="left")
    for col in ("role", "stage", "layers", "ranks", "GPU"):
        t.add_column(col)
    rows = 0
    for name, role in (("teacher", plan.teacher), ("student", plan.student)):
        if role is None:
            continue
        for i, s in enumerate(role.layout.stages):
            if rows >= max_rows:
                break
            t.add_row(name, str(i), f"{s.first_layer}-{s.last_layer - 1}", _ranks(s.ranks), s.gpu or "-")
            rows += 1
    out.print(t)


def _memory(plan: Plan) -> None:
    mb = plan.prediction.memory
    total = plan.prediction.memory_per_gpu_gib
    pct = f" ({total / mb.limit_gib:.0%} of {mb.limit_gib:g} GiB)" if mb.limit_gib else ""
    t = Table(title=f"Memory of the fullest GPU: rank {mb.gpu_rank} ({mb.role}) {_gib(total)}{pct}", title_justify="left")
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for k, v in sorted(mb.terms_gib.items(), key=lambda kv: -kv[1]):
        t.add_row(k + ("  [bold](largest)[/]" if k == mb.largest_term else ""), f"{v:,.2f}")
    out.print(t)
    per_role = ", ".join(f"{r} {_gib(v)}" for r, v in plan.prediction.memory_per_role_gib.items())
    if per_role:
        out.print(f"per role (max over its GPUs): {per_role}")


def _time(plan: Plan) -> None:
    pr = plan.prediction
    t = Table(title=f"Predicted step time {_s(pr.step_time_s)}", title_justify="left")
    t.add_column("component")
    t.add_column("time", justify="right")
    t.add_column("share", justify="right")
    for k, v in sorted(pr.breakdown_s.items(), key=lambda kv: -kv[1]):
        t.add_row(k, _s(v), f"{v / pr.step_time_s:.0%}" if pr.step_time_s else "-")
    out.print(t)
    line = (f"[bold]{pr.tokens_per_s:,.0f} tokens/s[/], MFU {pr.mfu:.1%}, utilization {pr.utilization:.1%}, "
            f"{_gb(pr.comm_bytes_per_step)} over links per step ("
            + ", ".join(f"{k} {_gb(v)}" for k, v in pr.bytes_per_step.items() if v) + ")")
    out.print(line)
    if pr.cost_per_million_tokens_usd is not None:
        extra = ""
        if plan.job.tokens:
            hours = plan.job.tokens / pr.tokens_per_s / 3600
            extra = (f"; {plan.job.tokens:.3g} tokens: {hours:,.1f} h, "
                     f"${pr.cost_per_million_tokens_usd * plan.job.tokens / 1e6:,.0f}")
        out.print(f"cost: ${pr.cost_per_million_tokens_usd:,.3f} per million tokens{extra}")
    if pr.idle_s:
        out.print("idle per step: " + ", ".join(f"{k} {_s(v)}" for k, v in pr.idle_s.items()))
    if pr.generation is not None:
        g = pr.generation
        out.print(f"teacher generation (one pass before training; the step above is the student's cross-entropy "
                  f"step): {_s(g.teacher_pass_s_per_step)} per step's worth of tokens; per replica "
                  f"{_per_token(g.decode_s_per_token)} per generated token ({g.decode_batch} sequences in flight, "
                  f"{g.decode_bound}-bound decode, mean context {g.mean_context_tokens:,.0f} tokens), "
                  f"{_per_token(g.prefill_s_per_token)} per prompt token (prompt ratio {g.prompt_ratio:g}); "
                  f"{_gib(g.memory_per_gpu_gib)} per GPU; {g.storage_bytes_per_token:g} B/token stored", soft_wrap=True)
    if pr.offline is not None:
        out.print(f"offline: one-off teacher pass {_s(pr.offline.teacher_pass_s_per_step)} per step's worth of "
                  f"tokens, {pr.offline.storage_bytes_per_token:,.0f} B/token stored")


def _baselines(plan: Plan) -> None:
    pr = plan.prediction
    t = Table(title="Against the baselines (same cost model, same cluster)", title_justify="left")
    for col in ("baseline", "step time", "kdplan speedup", "comm/step", "utilization", "memory/GPU"):
        t.add_column(col, justify="left" if col == "baseline" else "right")
    notes = []
    for name, b in (("single GPU", pr.baselines.single_gpu), ("naive data-parallel", pr.baselines.naive_dp),
                    ("mirror (ModelOpt-style)", pr.baselines.mirror)):
        sp = f"{b.step_time_s / pr.step_time_s:,.2f}x" if b.step_time_s else "-"
        t.add_row(name, _s(b.step_time_s) if b.step_time_s else "cannot run", sp, _gb(b.comm_bytes_per_step),
                  f"{b.utilization:.0%}" if b.utilization is not None else "-",
                  _gib(b.memory_per_gpu_gib) if b.memory_per_gpu_gib is not None else "-")
        notes.append(f"  {name}: {b.description if b.step_time_s else 'cannot run: ' + str(b.reason)}")
    out.print(t)
    if plan.kd.signal == "sequence":
        notes.append("  (sequence-level KD: these are baselines of the student's cross-entropy step; the teacher's "
                     "generation pass is priced apart, above)")
    out.print("\n".join(notes), soft_wrap=True)
    parts = []
    if pr.speedup_vs_single_gpu is not None:
        parts.append(f"{pr.speedup_vs_single_gpu:,.1f}x faster than single-GPU KD")
    if pr.speedup_vs_mirror is not None:
        parts.append(f"{pr.speedup_vs_mirror:,.2f}x vs mirror KD")
    if pr.comm_reduction_vs_naive_dp is not None:
        parts.append(f"{pr.comm_reduction_vs_naive_dp:.0%} less communication than naive DP KD")
    if parts:
        out.print("[bold]" + "; ".join(parts) + "[/]")


def _binds(plan: Plan) -> None:
    pr = plan.prediction
    mb = pr.memory
    lines = []
    if mb.limit_gib:
        lines.append(f"memory: rank {mb.gpu_rank} ({mb.role}) holds {_gib(pr.memory_per_gpu_gib)} of {mb.limit_gib:g} GiB "
                     f"({pr.memory_per_gpu_gib / mb.limit_gib:.0%}); largest term {mb.largest_term}")
    if pr.breakdown_s:
        k, v = max(pr.breakdown_s.items(), key=lambda kv: kv[1])
        lines.append(f"time: {k} is the largest part of the step ({_s(v)}, {v / pr.step_time_s:.0%})")
    comm = {k: v for k, v in pr.breakdown_s.items() if k.startswith("comm_")}
    if comm:
        k, v = max(comm.items(), key=lambda kv: kv[1])
        lines.append(f"link: {k[5:]} traffic is the most exposed communication ({_s(v)} per step)")
    else:
        lines.append("link: no communication is exposed (all hidden behind compute)")
    lines.append(f"GPUs: {plan.world_size} used of {plan.job.gpus}" if plan.world_size != plan.job.gpus
                 else f"GPUs: all {plan.world_size} used")
    for k, v in pr.idle_s.items():
        if v > 0.01 * pr.step_time_s:
            lines.append(f"balance: the {k} group idles {_s(v)} per step ({v / pr.step_time_s:.0%})")
    out.print("[bold]What binds[/]\n  " + "\n  ".join(lines))


def _alternatives(plan: Plan) -> None:
    if not plan.alternatives:
        return
    t = Table(title="Next best alternatives", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("step time", justify="right")
    t.add_column("vs plan", justify="right")
    t.add_column("memory/GPU", justify="right")
    t.add_column("configuration")
    for i, a in enumerate(plan.alternatives, 1):
        t.add_row(str(i), _s(a.step_time_s), f"{a.step_time_s / plan.prediction.step_time_s:.3f}x",
                  _gib(a.memory_per_gpu_gib), a.summary)
    out.print(t)


def _hours(x: float) -> str:
    return f"{x / 3600:,.2f} h"


def _whole_job(plan: Plan) -> None:
    """prediction.job as a timeline: teacher pass, cache, epochs, students."""
    jb = plan.prediction.job
    if jb is None:
        return
    cost = f", ${jb.cost_usd:,.0f}" if jb.cost_usd is not None else ""
    out.print(f"\n[bold]Whole job[/]: {len(jb.students)} student(s) x {jb.tokens_per_student:.3g} tokens, "
              f"{jb.epochs:.3g} epoch(s) of {jb.dataset_tokens:.3g} unique tokens: [bold]{jb.strategy}[/], "
              f"{_hours(jb.total_time_s)}{cost}; the teacher runs {jb.teacher_passes:.3g}x over each token", soft_wrap=True)
    if jb.cache_bytes and jb.strategy == "sequence":
        out.print(f"generated text: {jb.cache_bytes / 1e12:,.3g} TB of token ids on {jb.cache_storage or 'no storage tier'}")
    elif jb.cache_bytes:
        out.print(f"cache: {jb.cache_bytes / 1e12:,.3g} TB of {jb.cache_format} on {jb.cache_storage}")
    if len(jb.students) > 1 or jb.teacher_gpus:
        out.print(f"students: {jb.students_arrangement.replace('_', ' ')} ({jb.arrangement_reason})",
                  soft_wrap=True, markup=False)
    t = Table(show_header=True, header_style="bold")
    for c in ("start", "end", "GPUs", "phase", "what"):
        t.add_column(c)
    for p in jb.timeline:
        t.add_row(_hours(p.start_s), _hours(p.start_s + p.duration_s), str(p.gpus), p.name, p.detail)
    out.print(t)
    base = jb.baselines.separate_mirror
    if base.total_time_s is not None and jb.speedup_vs_separate_mirror is not None:
        out.print(f"[bold]{jb.speedup_vs_separate_mirror:.2f}x[/] faster than separate mirror-KD jobs "
                  f"({_hours(base.total_time_s)}: the teacher recomputed for every student and epoch)")
    else:
        out.print(f"separate mirror-KD jobs: cannot run ({base.reason})")
    out.print(f"why: {jb.reason}", soft_wrap=True, markup=False)
    for r in jb.rejected:
        out.print(f"  not chosen: {r}", soft_wrap=True, markup=False)


def _executor(plan: Plan) -> None:
    """Whether `kdplan run` executes the plan (Plan.executor, kdplan.schema.capability)."""
    ex = plan.executor
    if ex is None:
        return
    if ex.runnable:
        out.print("executor: `kdplan run` executes this plan")
        return
    out.print(f"[bold yellow]executor: `kdplan run` cannot execute this plan[/] ({len(ex.unsupported)} unsupported;"
              " kdplan plan --runnable plans only what it runs):")
    for u in ex.unsupported:
        out.print(f"  {u}", soft_wrap=True, markup=False)


def render_plan(plan: Plan) -> None:
    plan = markup_safe(plan)
    j = plan.job
    teacher = plan.teacher.model.name if plan.teacher else "no teacher"
    out.print(f"\n[bold]kdplan[/]: {teacher} -> {plan.student.model.name} on {plan.world_size} GPUs "
              f"({', '.join(dict.fromkeys(j.gpu_types))}, {j.cluster}); {j.global_batch} x {j.seq_len} tokens per step, {j.precision}")
    _layouts(plan)
    _rank_map(plan)
    _time(plan)
    _memory(plan)
    _baselines(plan)
    _binds(plan)
    _alternatives(plan)
    _whole_job(plan)
    _executor(plan)
    s = plan.solver
    gap = f", gap {s.gap:.2%}" if s.gap is not None else ""
    if s.status == "time_limit":
        gap = (f" (stopped at its time limit: not proven optimal, gap {s.gap:.2%}" if s.gap is not None else
               " (stopped at its time limit: not proven optimal, gap unknown") + "; raise \\[solver] time_limit_s)"
    out.print(f"solver: {s.name}, {s.status}{gap}, {s.num_candidates:,} candidate combinations, "
              f"{s.solve_time_s:.2f} s, objective {s.objective}")
