"""Micro-benchmarks for `kdplan profile`, run under torchrun:

    torchrun --standalone --nproc_per_node=N -m executor.bench.run --spec SPEC.json --out RAW.json

SPEC.json (written by kdplan.calibrate.profile) lists the matrix-multiply and attention shapes of
the models' layers, the dtypes, the message sizes and the time budget. Every rank measures compute
at the same time (on a CPU the ranks share cores, and that sharing is what a run sees); rank 0
writes RAW.json with raw times only, and kdplan fits the profile from them. Progress goes to
stdout as lines ``PROGRESS <done> <total> <label>`` for the caller's progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from executor.mesh import close_process_group

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Bench:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = uses_cuda(spec)
        self.device = bench_device(spec)
        self.min_time_s = spec["min_time_s"]
        self.done, self.total = 0, 0
        self._meshes: dict = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def progress(self, label: str) -> None:
        self.done += 1
        if self.rank == 0:
            print(f"PROGRESS {self.done} {self.total} {label}", flush=True)

    def time_fn(self, fn, *, reps: int | None = None) -> float:
        """Time of one call of fn. Every rank runs the same number of repetitions (rank 0 decides
        from its warm-up) so that ranks sharing a device or a CPU stay busy together.
        GPU: CUDA events around all repetitions back to back, divided by their number (the mean
        device time: no host round trip or launch gap per repetition). CPU: median wall time."""
        fn()
        self.sync()
        first = self._elapsed(fn, 1)
        if reps is None:
            # an NCCL group takes device tensors only
            reps = max(2, min(200 if self.cuda else 50, int(self.min_time_s / max(first, 1e-6))))
            n = torch.full((1,), reps, device=self.device)
            dist.broadcast(n, 0)
            reps = int(n.item())
        if self.cuda:
            return self._elapsed(fn, reps) / reps
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _elapsed(self, fn, reps: int) -> float:
        return elapsed_s(fn, reps, cuda=self.cuda)

    # ---- compute ------------------------------------------------------------------------------

    def gemm(self, g: dict, dtype: str) -> dict:
        dt = DTYPES[dtype]
        a = torch.randn(g["m"], g["k"], device=self.device, dtype=dt)
        b = torch.randn(g["k"], g["n"], device=self.device, dtype=dt)
        t = self.time_fn(lambda: torch.mm(a, b))
        return dict(g, dtype=dtype, flops=2.0 * g["m"] * g["k"] * g["n"], time_s=t)

    def attention(self, at: dict, dtype: str) -> dict:
        dt = DTYPES[dtype]
        shape = (at["batch"], at["heads"], at["seq"], at["head_dim"])
        q, k, v = (torch.randn(shape, device=self.device, dtype=dt) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t = self.time_fn(lambda: sdpa(q, k, v, is_causal=True))
        flops = 4.0 * at["batch"] * at["seq"] ** 2 * at["heads"] * at["head_dim"]
        return dict(at, dtype=dtype, flops=flops, time_s=t)

    def elementwise(self, g: dict, dtype: str) -> dict:
        """Norms, activation and residual adds of one layer on [tokens, k] (the fwd mlp_up GEMM's
        input width) and [tokens, n]: the memory-bound work around the matrix multiplies."""
        dt = DTYPES[dtype]
        x = torch.randn(g["m"], g["k"], device=self.device, dtype=dt)
        u = torch.randn(g["m"], g["n"], device=self.device, dtype=dt)
        w = torch.ones(g["k"], device=self.device, dtype=dt)

        def layer():
            for _ in range(2):  # two norms and two residual adds per layer
                y = torch.nn.functional.rms_norm(x, (g["k"],), w)
                y = y + x
            return torch.nn.functional.silu(u) * u

        return dict(g, dtype=dtype, time_s=self.time_fn(layer))

    def loss(self, tokens: int, vocab: int) -> dict:
        """The student's loss over the vocabulary, forward and backward, exactly as training runs
        it (executor.kd.losses.kd_loss: CE + forward KL at T = 2 against dense teacher logits)
        on fp32 [tokens, vocab] logits: memory bound, and cache bound while the tensors are small."""
        from executor.kd.losses import TeacherTarget, kd_loss
        g = torch.Generator(device=self.device).manual_seed(tokens)  # drawn on the device (GiBs on a GPU)
        logits = torch.randn(tokens, vocab, generator=g, device=self.device).requires_grad_(True)
        t_logits = torch.randn(tokens, vocab, generator=g, device=self.device)
        labels = torch.randint(0, vocab, (tokens,), generator=g, device=self.device)
        target = TeacherTarget.dense(t_logits)

        def step():
            logits.grad = None
            kd_loss(logits, target, labels, loss="forward_kl", temperature=2.0, alpha=0.5).total_sum.backward()

        out = {"tokens": tokens, "vocab": vocab, "kind": "dense", "elements": tokens * vocab,
               "time_s": self._median_time(step, reps=4)}
        return out if self.cuda else dict(out, clock="process_time")

    def loss_kind(self, tokens: int, vocab: int, kind: str) -> dict:
        """The student's loss, forward and backward, as training runs it (executor.train._kd:
        kd_loss with the checkpointed recompute) on fp32 [tokens, vocab] logits against a teacher
        target of ``kind`` ("none": plain training; else a compression, e.g. "dense", "topk:64",
        "sample:64", encoded and decoded by executor.kd.compression as the executor does). Priced
        per kind (GPUSpec.loss_passes): the kinds differ in more than a count of memory passes."""
        from types import SimpleNamespace

        from executor.kd.compression import decode, encode
        from executor.kd.losses import TeacherTarget
        from executor.train import _kd
        from kdplan.schema.compression import parse_compression
        g = torch.Generator(device=self.device).manual_seed(tokens + vocab)
        logits = torch.randn(tokens, vocab, generator=g, device=self.device).requires_grad_(True)
        labels = torch.randint(0, vocab, (tokens,), generator=g, device=self.device)
        target = None
        if kind != "none":
            t_logits = torch.randn(tokens, vocab, generator=g, device=self.device)
            comp = parse_compression(kind)
            target = (TeacherTarget.dense(t_logits) if comp.kind == "dense"
                      else decode(encode(t_logits, comp, temperature=2.0), vocab))
        kd = SimpleNamespace(loss="forward_kl", temperature=2.0, alpha=0.5, beta=0.5)

        def step():
            logits.grad = None
            _kd(logits, target, labels, kd, vocab).total_sum.backward()

        out = {"tokens": tokens, "vocab": vocab, "kind": kind.split(":")[0], "compression": kind,
               "elements": tokens * vocab, "time_s": self._median_time(step, reps=4)}
        return out if self.cuda else dict(out, clock="process_time")

    def head_loss(self, tokens: int, hidden: int, vocab: int, kind: str = "dense", heap: bool = True) -> dict:
        """One micro-batch's vocabulary projection and loss as training runs them (head_loss_step:
        the head's forward and backward matmuls, the KD loss against a ``kind`` target with its
        recompute) at ``tokens`` x ``vocab`` fp32 logits: the time (Bench._median_time) and, on a
        CPU, the host heap that step leaves resident, measured by rank 0 in a fresh process
        (host_heap_bytes): the profile's curves over micro-batch sizes (GPUSpec.loss_size_factor,
        loss_heap_copies)."""
        step = head_loss_step(tokens, hidden, vocab, self.device, kind)
        out = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "kind": kind.split(":")[0], "compression": kind,
               "elements": tokens * vocab, "time_s": self._median_time(step, reps=4),
               "clock": "cuda events" if self.cuda else "process_time"}
        del step
        if heap and not self.cuda and self.rank == 0:
            out["heap_bytes"] = host_heap_bytes(tokens, hidden, vocab, kind)
        return out

    def sample_encode(self, tokens: int, vocab: int, n: int) -> dict:
        """The teacher's sampled encoding sample:``n`` (executor.kd.compression.encode: softmax at
        T, the CDF, systematic draws, index packing) of fp32 [tokens, vocab] logits, with the
        executor's per-row offsets, and its decoding into the student's target (decode: the
        unpacking, counts to weights), which the executor runs once per teacher micro-batch too
        (executor.teacher: a colocated teacher decodes what it delivers; GPUSpec.sample_passes)."""
        from executor.kd.compression import decode, encode
        from kdplan.schema.compression import parse_compression
        g = torch.Generator(device=self.device).manual_seed(tokens + n)
        logits = torch.randn(tokens, vocab, generator=g, device=self.device)
        offsets = torch.rand(tokens, generator=g, device=self.device, dtype=torch.float64)
        comp = parse_compression(f"sample:{n}")
        t = self._median_time(lambda: decode(encode(logits, comp, temperature=2.0, offsets=offsets), vocab))
        return {"tokens": tokens, "vocab": vocab, "samples": n, "elements": tokens * vocab, "time_s": t, "decoded": True}

    def topk(self, tokens: int, vocab: int, k: int) -> dict:
        """The teacher's top-k encoding (executor.kd.compression.encode: log-softmax at T, top-k,
        tail mass, index packing) of fp32 [tokens, vocab] logits with its decoding into the
        student's target (decode, once per teacher micro-batch as the executor runs it), and one
        read pass (amax) over the same tensor: their ratio is the cost in passes
        (GPUSpec.topk_passes)."""
        from executor.kd.compression import decode, encode
        from kdplan.schema.compression import Compression
        g = torch.Generator(device=self.device).manual_seed(tokens + k)
        logits = torch.randn(tokens, vocab, generator=g, device=self.device)
        comp = Compression(kind="topk", k=k, bits=16)
        t_enc = self._median_time(lambda: decode(encode(logits, comp, temperature=2.0), vocab))
        t_pass = self._median_time(lambda: logits.amax())
        return {"tokens": tokens, "vocab": vocab, "k": k, "time_s": t_enc, "pass_s": t_pass, "passes": t_enc / t_pass}

    # ---- framework overheads ----------------------------------------------------------------

    def _stage(self, ov: dict, layers: int, variant: str):
        """The executor's own stage module (executor.pipeline.make_stage) of the spec's model cut
        to ``layers`` blocks, on this rank's device, parallelised as ``variant`` says: "train" /
        "forward" plain, "tp" tensor-parallel over every rank (executor.parallelize.apply_tp,
        DTensor), "fsdp" FSDP2 over every rank (apply_fsdp, zero 3)."""
        from torch.distributed.device_mesh import init_device_mesh

        from executor.models import build_model, materialize
        from executor.parallelize import apply_fsdp, apply_tp
        from executor.pipeline import make_stage
        from kdplan.schema.model import ModelSpec
        spec = ModelSpec.model_validate(dict(ov["model"], num_layers=layers))
        model = make_stage(build_model(spec), 0, layers, is_first=True, is_last=True)
        if variant in ("tp", "fsdp"):
            mesh = self._meshes.get(variant)
            if mesh is None:
                mesh = self._meshes[variant] = init_device_mesh(self.device.type, (self.world,))
            if variant == "tp":
                apply_tp(model, mesh, sequence_parallel=False)
            else:
                apply_fsdp(model, mesh, zero=3)
        model = materialize(model, seed=0, device=self.device)
        if variant == "forward":
            model.eval().requires_grad_(False)
        return model, spec.vocab_size

    def overhead(self, ov: dict, variant: str, layers: int, tokens: int) -> dict:
        """One micro-batch of ``tokens`` (1 x tokens) through a ``layers``-block stage as training
        runs it (forward, the KD loss against dense teacher logits, backward: executor.kd.losses)
        or, for "forward", the teacher's no-grad forward. Fitted over tokens and layers (kdplan.
        calibrate.fit.fit_fixed_costs), the intercepts are the fixed costs: per block, per
        micro-batch. GPU: CUDA events around back-to-back repetitions (Bench.time_fn), so launch
        gaps the device waits through are counted; synchronised only at the measurement's ends.
        CPU: the least process CPU time of a fixed number of repetitions (Bench._median_time; a
        fixed count keeps the ranks' collectives in step): the cost on an idle machine, which
        other processes' time slices on shared cores do not inflate; a wait on the other rank is
        not CPU time, and the links' latency prices it."""
        from executor.kd.losses import TeacherTarget, kd_loss
        model, V = self._stage(ov, layers, variant)
        g = torch.Generator(device=self.device).manual_seed(tokens)
        ids = torch.randint(0, V, (1, tokens), generator=g, device=self.device)
        labels = torch.randint(0, V, (tokens,), generator=g, device=self.device)
        target = TeacherTarget.dense(torch.randn(tokens, V, generator=g, device=self.device))

        def logits():
            out = model(ids)
            return getattr(out, "logits", out).reshape(-1, V)

        # as the executor computes on a GPU: bf16 autocast over fp32 weights (executor.train)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda and self.spec["dtypes"][0] == "bf16")
        if variant == "forward":
            def step():
                with torch.no_grad(), amp:
                    logits()
        else:
            def step():
                for p in model.parameters():
                    p.grad = None
                with amp:
                    out = logits()
                kd_loss(out, target, labels, loss="forward_kl", temperature=2.0, alpha=0.5).total_sum.backward()
        t = self._median_time(step, reps=9)
        del model
        return {"variant": variant, "layers": layers, "tokens": tokens, "ranks": self.world, "time_s": t,
                "clock": "cuda events" if self.cuda else "process_time"}

    def ddp_sync(self, ov: dict, layers: int, tokens: int = 16) -> dict:
        """What DDP's gradient synchronisation costs beyond the all-reduce (FrameworkOverheads.
        ddp_sync_byte_s): the executor's stage at ``layers`` blocks wrapped as the executor wraps a
        data-parallel role (executor.parallelize.apply_ddp over every rank, its counting comm
        hook), one training micro-batch of ``tokens`` (as ``overhead``) that synchronises, one under
        ``no_sync`` (what accumulating micro-batches run), and a plain all-reduce of a flat buffer
        of the stage's gradient bytes (what the links price). Clock as ``overhead`` (CPU: least
        process time, which counts gloo's threads; GPU: CUDA events)."""
        from executor.kd.grad_hooks import ByteCounter
        from executor.kd.losses import TeacherTarget, kd_loss
        from executor.parallelize import apply_ddp
        model, V = self._stage(ov, layers, "train")
        ddp = apply_ddp(model, dist.group.WORLD, grad_compression="none", counter=ByteCounter())
        g = torch.Generator(device=self.device).manual_seed(tokens)
        ids = torch.randint(0, V, (1, tokens), generator=g, device=self.device)
        labels = torch.randint(0, V, (tokens,), generator=g, device=self.device)
        target = TeacherTarget.dense(torch.randn(tokens, V, generator=g, device=self.device))

        def step(sync: bool):
            def run():
                for p in ddp.parameters():
                    p.grad = None
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    out = ddp(ids)
                    out = getattr(out, "logits", out).reshape(-1, V)
                    kd_loss(out, target, labels, loss="forward_kl", temperature=2.0, alpha=0.5).total_sum.backward()
            return run

        elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flat = torch.zeros(elements, device=self.device)
        # interleaved, each the least of its repetitions: a burst of other work lands on both alike
        sync_s = min(self._median_time(step(True), reps=5) for _ in range(2))
        nosync_s = min(self._median_time(step(False), reps=5) for _ in range(2))
        allreduce_s = self._median_time(lambda: dist.all_reduce(flat), reps=9)
        del ddp, model, flat
        return {"layers": layers, "tokens": tokens, "ranks": self.world, "grad_bytes": 4 * elements,
                "sync_s": sync_s, "no_sync_s": nosync_s, "allreduce_s": allreduce_s,
                "clock": "cuda events" if self.cuda else "process_time"}

    def block_elementwise(self, ov: dict, batch: int) -> dict:
        """What the executor's own block spends beyond its matrix multiplies and attention core,
        forward (the teacher's no-grad forward, as "forward" stages run): half the stage at 3 blocks
        less the stage at 1 block is one block (embedding, final norm and head cancel), and its
        Linear layers (F.linear on its own weights at its input widths) and SDPA (its heads, causal)
        are timed apart at the same ``batch`` x seq tokens. Hugging Face modeling code runs the norms
        (LlamaRMSNorm: cast, pow, mean, rsqrt, two products), rotary embedding, activation and
        residuals op by op; the rest over two batch sizes, per token, is what
        Overheads.eager_elementwise_passes prices (kdplan.calibrate.profile.fit_block_ops). Clock as
        ``overhead`` (GPU: CUDA events). On a CPU the two stages run back to back in each repetition
        and the block is the median of their differences (process time): the head over a large
        vocabulary dwarfs a proxy block, and a difference of two separately taken medians one block
        apart (the method before session 11) fell below the block's own Linear layers in 1 of 3 --tiny runs
        while the other rank shared the memory bus."""
        from executor.parallelize import blocks
        F = torch.nn.functional
        seq = min(int(ov.get("block_seq", 256)), int(ov["model"].get("max_positions") or 256))
        half = self.cuda and self.spec["dtypes"][0] == "bf16"  # as ``overhead``: bf16 autocast on a GPU
        fwds, models = {}, {}
        for layers in (1, 3):
            model, V = self._stage(ov, layers, "forward")
            g = torch.Generator(device=self.device).manual_seed(batch)
            ids = torch.randint(0, V, (batch, seq), generator=g, device=self.device)
            amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=half)

            def fwd(model=model, ids=ids, amp=amp):
                with torch.no_grad(), amp:
                    model(ids)
            fwds[layers], models[layers] = fwd, model
        if self.cuda:
            t1, t3 = self.time_fn(fwds[1]), self.time_fn(fwds[3])
            block = (t3 - t1) / 2
        else:
            fwds[1](), fwds[3]()  # warm-up
            diffs, ones = [], []
            for _ in range(15):
                t0 = time.process_time()
                fwds[1]()
                t1 = time.process_time()
                fwds[3]()
                diffs.append((time.process_time() - t1 - (t1 - t0)) / 2)
                ones.append(t1 - t0)
            block, t1 = statistics.median(diffs), statistics.median(ones)
        blk = blocks(models[3])[0]
        dt = torch.bfloat16 if half else next(blk.parameters()).dtype
        lins = [(torch.randn(batch * seq, m.in_features, device=self.device, dtype=dt), m.weight.to(dt),
                 None if m.bias is None else m.bias.to(dt))
                for m in blk.modules() if isinstance(m, torch.nn.Linear)]
        heads, head_dim = ov["model"]["num_heads"], ov["model"].get("head_dim") or ov["model"]["hidden_size"] // ov["model"]["num_heads"]
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=self.device, dtype=dt) for _ in range(3))
        with torch.no_grad():
            t_lin = self._median_time(lambda: [F.linear(x, w, b) for x, w, b in lins], reps=9)
            t_attn = self._median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=9)
        del models, fwds, lins
        return {"batch": batch, "seq": seq, "tokens": batch * seq, "model": ov["model"], "bytes": 2 if half else 4,
                "block_s": block, "stage_1_block_s": t1, "linear_s": t_lin, "attention_s": t_attn,
                "clock": "cuda events" if self.cuda else "process_time"}

    def optimizer(self, tensors: int, elements: int) -> dict:
        """One AdamW step (the executor's optimizer, torch defaults) over ``tensors`` fp32 tensors
        of ``elements`` each: fitted over the count, the slope is the per-tensor fixed cost."""
        params = [torch.zeros(elements, device=self.device, requires_grad=True) for _ in range(tensors)]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)
        return {"tensors": tensors, "elements": elements,
                "time_s": self._median_time(opt.step, reps=9)}

    def _median_time(self, fn, reps: int = 5) -> float:
        """GPU: the timed mean. CPU: the process's own CPU time (on a CPU shared with other work,
        not how much of a core it got just then), the median of ``reps`` after one warm-up. The
        median, not the best: every rank of `kdplan profile` runs the same repetitions at once, as
        the executor's ranks run their steps, so the memory-bound kernels (the loss over [tokens,
        V], norms) share the memory bus with the other rank; the best repetition is the one the
        other rank disturbed least, which a training step never gets (the best of 4 put one loss
        kind at 26 ms on one idle day and 34 ms on another: cpu_local_refresh's uncalibrated
        tiny-plan error moved -19% -> -25% with it)."""
        if self.cuda:
            return self.time_fn(fn)
        fn()
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return statistics.median(times)

    def memory_bandwidth(self, size_bytes: int) -> dict:
        src = torch.empty(size_bytes // 4, device=self.device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        t = self.time_fn(lambda: dst.copy_(src))
        return {"bytes": size_bytes, "time_s": t, "bytes_moved": 2 * size_bytes}

    def host_copy(self, size_bytes: int) -> list[dict]:
        host = torch.empty(size_bytes, dtype=torch.uint8, device="cpu").pin_memory()
        dev = torch.empty(size_bytes, dtype=torch.uint8, device=self.device)
        h2d = self.time_fn(lambda: dev.copy_(host, non_blocking=True))
        d2h = self.time_fn(lambda: host.copy_(dev, non_blocking=True))
        return [{"op": "copy", "direction": "h2d", "nranks": 1, "bytes": size_bytes, "time_s": h2d},
                {"op": "copy", "direction": "d2h", "nranks": 1, "bytes": size_bytes, "time_s": d2h}]

    # ---- communication ------------------------------------------------------------------------

    def collective(self, op: str, size_bytes: int, group, ranks: list[int], tier: str) -> dict | None:
        k = len(ranks)
        n = max(k, size_bytes // 4 // k * k)  # fp32 elements, divisible by the group size
        buf = torch.ones(n, device=self.device)
        part = torch.ones(n // k, device=self.device)
        me = self.rank in ranks
        if op == "all_reduce":
            fn = lambda: dist.all_reduce(buf, group=group)  # noqa: E731
        elif op == "all_gather":
            fn = lambda: dist.all_gather_into_tensor(buf, part, group=group)  # noqa: E731
        elif op == "reduce_scatter":
            fn = lambda: dist.reduce_scatter_tensor(part, buf, group=group)  # noqa: E731
        elif op == "send_recv":
            src, dst = ranks[0], ranks[-1]
            fn = (lambda: dist.send(buf, dst)) if self.rank == src else (lambda: dist.recv(buf, src))  # noqa: E731
            me = self.rank in (src, dst)
        else:
            raise ValueError(op)
        # Fixed repetitions from the size so every rank agrees without extra messages.
        reps = max(2, min(20, int(self.spec["comm_budget_bytes"] // max(size_bytes, 1))))
        times = torch.zeros(reps + 1, device=self.device)  # all-reduced below: on the group's device
        for i in range(reps + 1):  # the first one is warm-up
            dist.barrier()
            if me:
                times[i] = self._elapsed(fn, 1)  # GPU: events around the collective on this stream
            self.sync()
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a collective ends when its slowest rank does
        return {"op": op, "tier": tier, "nranks": k, "bytes": n * 4,
                "time_s": statistics.median(times[1:].tolist())}


def head_loss_step(tokens: int, hidden: int, vocab: int, device: torch.device, kind: str = "dense"):
    """A training micro-batch's last-stage work beyond its blocks, as executor.train runs it:
    the head (F.linear of [tokens x hidden] activations on a [vocab x hidden] weight) and
    executor.train._kd (forward KL at T = 2 against a teacher target of ``kind``, as
    Bench.loss_kind builds it: "dense", a compression such as "topk:64" / "sample:64" encoded and
    decoded as the executor does, or "none": plain CE; the checkpointed recompute), backward into
    the activations and the weight. Returns the step (a closure over its tensors)."""
    from types import SimpleNamespace

    from executor.kd.compression import decode, encode
    from executor.kd.losses import TeacherTarget
    from executor.train import _kd
    from kdplan.schema.compression import parse_compression
    g = torch.Generator(device=device).manual_seed(tokens + hidden)
    x = torch.randn(tokens, hidden, generator=g, device=device).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, device=device) * hidden ** -0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    target = None
    if kind != "none":
        t_logits = torch.randn(tokens, vocab, generator=g, device=device)
        comp = parse_compression(kind)
        target = (TeacherTarget.dense(t_logits) if comp.kind == "dense"
                  else decode(encode(t_logits, comp, temperature=2.0), vocab))
        del t_logits
    kd = SimpleNamespace(loss="forward_kl", temperature=2.0, alpha=0.5, beta=0.5)

    def step():
        x.grad = w.grad = None
        logits = torch.nn.functional.linear(x, w)
        _kd(logits, target, labels, kd, vocab).total_sum.backward()
    return step


def _proc_status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def heap_probe(tokens: int, hidden: int, vocab: int, kind: str = "dense", reps: int = 4) -> int | None:
    """In a fresh process (executor.bench.run --heap-probe): the host memory the head-and-loss
    step leaves resident, in the regime the executor runs on a CPU (executor.hostmem: freed
    memory kept, so the heap's high-water mark stays). A warm-up at 16 tokens first (torch's
    one-off kernel and thread-pool set-up), then the peak RSS (VmHWM) over ``reps`` steps less
    the RSS before them. None without /proc."""
    from executor.hostmem import retain_host_memory
    retain_host_memory()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cpu = torch.device("cpu")
    head_loss_step(16, hidden, vocab, cpu, kind)()
    before = _proc_status_bytes("VmRSS")
    step = head_loss_step(tokens, hidden, vocab, cpu, kind)
    for _ in range(reps):
        step()
    peak = _proc_status_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def host_heap_bytes(tokens: int, hidden: int, vocab: int, kind: str = "dense", timeout_s: float = 600) -> int | None:
    """heap_probe in a fresh Python process (this one's heap already holds every earlier
    measurement's freed memory); None if it failed or this is not Linux."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "executor.bench.run", "--heap-probe", f"{tokens},{hidden},{vocab},{kind}"],
                       capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    try:
        n = int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else -1
    except (ValueError, IndexError):
        n = -1
    return n if n >= 0 else None


def elapsed_s(fn, reps: int, *, cuda: bool) -> float:
    """Seconds for ``reps`` back-to-back calls of fn: CUDA events on the current stream around all
    of them (device time, no host round trip per call), or the wall clock on a CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


def overhead_variants(ov: dict, world: int) -> list[str]:
    """The framework-overhead variants measured: plain training and forward, and on 2+ ranks
    tensor parallel (DTensor) and FSDP2 over all of them."""
    if not ov:
        return []
    tp_ok = world > 1 and ov["model"]["num_heads"] % world == 0 and ov["model"].get("num_kv_heads", 1) % world == 0
    return [v for v in ov.get("variants", ["train", "forward", "tp", "fsdp"])
            if v in ("train", "forward") or (v == "fsdp" and world > 1) or (v == "tp" and tp_ok)]


def loss_kinds_count(lk: dict) -> int:
    """Measurements of spec["loss_kinds"]: each kind per vocabulary, and the sampled encoding."""
    return len(lk.get("vocabs", [])) * (len(lk.get("kinds", [])) + (1 if lk.get("samples") else 0))


def head_loss_points(hl: dict) -> list[tuple[int, str]]:
    """spec["head_loss"]'s (tokens, kind) measurements: the dense KD loss at every token count,
    each of the other kinds at ``kind_tokens``."""
    return ([(t, "dense") for t in hl.get("tokens", [])]
            + [(hl["kind_tokens"], k) for k in hl.get("kinds", []) if k != "dense"])


def head_loss_count(hl: dict) -> int:
    return len(head_loss_points(hl))


def overhead_count(ov: dict, world: int) -> int:
    return (len(overhead_variants(ov, world)) * len(ov.get("layers", [])) * len(ov.get("tokens", []))
            + (len(ov.get("layers", [])) if world > 1 and ov and ov.get("ddp_sync", True) else 0)
            + len(ov.get("block_batches", [])) + len(ov.get("optimizer_tensors", [])) + (1 if ov.get("optimizer_large_elements") else 0))


def uses_cuda(spec: dict) -> bool:
    return torch.cuda.is_available() and spec.get("device", "auto") != "cpu"


def bench_device(spec: dict) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK, or the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if uses_cuda(spec) else torch.device("cpu")


def groups(world: int, local: int) -> list[tuple[str, list[int]]]:
    """Groups to measure: all ranks of node 0 (intra) and, on several nodes, one rank per node."""
    out = [("intra_node", list(range(min(local, world))))]
    if world > local:
        out.append(("inter_node", list(range(0, world, local))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--heap-probe", help="TOKENS,HIDDEN,VOCAB,KIND: print heap_probe's bytes and exit (one CPU process)")
    args = ap.parse_args()
    if args.heap_probe:
        t, h, v, kind = args.heap_probe.split(",")
        n = heap_probe(int(t), int(h), int(v), kind)
        print(-1 if n is None else n)
        return
    if not (args.spec and args.out):
        ap.error("--spec and --out are required")
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = json.load(open(args.spec))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    host_memory = None
    if not uses_cuda(spec):  # as the executor runs on a CPU (executor.launch): freed memory kept
        from executor.hostmem import retain_host_memory
        host_memory = retain_host_memory()
    fp32_matmul = "ieee"
    if uses_cuda(spec):
        torch.cuda.set_device(bench_device(spec))  # before NCCL starts: rank r on cuda:LOCAL_RANK
        # fp32 GEMMs on TF32 tensor cores: the fp32 peaks of the shipped GPU profiles (h100/h200
        # 494, a100 156 TFLOP/s) are TF32 ones, and efficiencies are fitted against them. One API
        # only (torch >= 2.9 refuses a mix of its legacy and new TF32 switches); cuDNN's TF32 is on
        # by default.
        try:
            torch.set_float32_matmul_precision("high")
            fp32_matmul = torch.get_float32_matmul_precision()
        except RuntimeError as e:
            fp32_matmul = f"unknown ({str(e)[:80]})"
    # GPU: NCCL for the device collectives measured, gloo for any CPU tensor (barriers, objects)
    backend = "cpu:gloo,cuda:nccl" if uses_cuda(spec) else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    b = Bench(spec)
    load_before = os.getloadavg()[0]
    world, local = b.world, int(os.environ.get("LOCAL_WORLD_SIZE", b.world))
    tiers = [(t, r) for t, r in groups(world, local) if len(r) > 1]
    pgs = {t: dist.new_group(r) for t, r in tiers}
    dts = spec["dtypes"]
    ups = [g for g in spec["gemms"] if g["label"].endswith("mlp_up fwd")]
    b.total = (len(spec["gemms"]) + len(spec["attention"]) + len(ups)) * len(dts) + 1 \
        + len(tiers) * len(spec["ops"]) * len(spec["sizes"]) + (2 if b.cuda else 0) \
        + len((spec.get("loss") or {}).get("tokens", [])) \
        + len((spec.get("topk") or {}).get("ks", [])) * len((spec.get("topk") or {}).get("vocabs", [])) \
        + loss_kinds_count(spec.get("loss_kinds") or {}) \
        + head_loss_count(spec.get("head_loss") or {}) \
        + overhead_count(spec.get("overheads") or {}, world)
    raw: dict = {"gemms": [], "attention": [], "elementwise": [], "collectives": [], "host_copy": []}
    for dt in dts:
        for g in spec["gemms"]:
            raw["gemms"].append(b.gemm(g, dt))
            b.progress(f"matmul {dt} {g['label']}")
        for at in spec["attention"]:
            raw["attention"].append(b.attention(at, dt))
            b.progress(f"attention {dt} {at['label']}")
        for g in ups:
            raw["elementwise"].append(b.elementwise(g, dt))
            b.progress(f"elementwise {dt} {g['label']}")
    raw["memory"] = b.memory_bandwidth(spec["memory_bytes"])
    b.progress("memory bandwidth")
    loss = spec.get("loss") or {}
    raw["loss"] = []
    for tokens in loss.get("tokens", []):
        raw["loss"].append(dict(b.loss(tokens, loss["vocab"]), passes=loss.get("passes")))
        b.progress(f"loss over the vocabulary, {tokens} tokens")
    tk = spec.get("topk") or {}
    raw["topk"] = []
    for vocab in tk.get("vocabs", []):
        for k in tk["ks"]:
            if k <= vocab:
                raw["topk"].append(b.topk(max(8, tk["elements"] // vocab), vocab, k))
            b.progress(f"teacher top-{k} encoding, vocabulary {vocab}")
    lk = spec.get("loss_kinds") or {}
    raw["loss_kinds"], raw["sample_encode"] = [], []
    for vocab in lk.get("vocabs", []):
        tokens = max(8, lk["elements"] // vocab)
        for kind in lk["kinds"]:
            raw["loss_kinds"].append(b.loss_kind(tokens, vocab, kind))
            b.progress(f"loss {kind}, vocabulary {vocab}")
        if lk.get("samples"):
            raw["sample_encode"].append(b.sample_encode(tokens, vocab, lk["samples"]))
            b.progress(f"teacher sample:{lk['samples']} encoding, vocabulary {vocab}")
    hl = spec.get("head_loss") or {}
    raw["head_loss"] = []
    for tokens, kind in head_loss_points(hl):
        raw["head_loss"].append(b.head_loss(tokens, hl["hidden"], hl["vocab"], kind, heap=hl.get("heap", True)))
        b.progress(f"head and loss ({kind}), {tokens} x {hl['vocab']} logits")
    ov = spec.get("overheads") or {}
    raw["overheads"], raw["optimizer"] = [], []
    for variant in overhead_variants(ov, world):
        for layers in ov["layers"]:
            for tokens in ov["tokens"]:
                raw["overheads"].append(b.overhead(ov, variant, layers, tokens))
                b.progress(f"framework overhead {variant} {layers} blocks {tokens} tokens")
    raw["ddp_sync"] = []
    for layers in ov.get("layers", []) if world > 1 and ov.get("ddp_sync", True) else []:
        raw["ddp_sync"].append(b.ddp_sync(ov, layers))
        b.progress(f"DDP gradient synchronisation, {layers} blocks")
    raw["block_elementwise"] = []
    for batch in ov.get("block_batches", []):
        raw["block_elementwise"].append(b.block_elementwise(ov, batch))
        b.progress(f"block beyond its matmuls, {batch} x {raw['block_elementwise'][-1]['seq']} tokens")
    for n in ov.get("optimizer_tensors", []):
        raw["optimizer"].append(b.optimizer(n, ov["optimizer_elements"]))
        b.progress(f"optimizer step over {n} tensors")
    if ov.get("optimizer_large_elements"):  # the per-byte rate, beside the per-tensor cost
        n = ov["optimizer_tensors"][0]
        raw["optimizer"].append(b.optimizer(n, ov["optimizer_large_elements"]))
        b.progress(f"optimizer step over {n} tensors of {ov['optimizer_large_elements']} elements")
    if b.cuda:
        raw["host_copy"] = b.host_copy(spec["memory_bytes"])
        b.progress("host copy")
        b.progress("host copy")
    for tier, ranks in tiers:
        for op in spec["ops"]:
            for size in spec["sizes"]:
                raw["collectives"].append(b.collective(op, size, pgs[tier], ranks, tier))
                b.progress(f"{op} {tier} {size} B")
    if b.rank == 0:
        raw["meta"] = {
            "host": socket.gethostname(), "torch_version": torch.__version__, "backend": backend,
            "world_size": world, "local_world_size": local, "threads": torch.get_num_threads(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": torch.cuda.get_device_name(b.device) if b.cuda else f"cpu ({platform.processor() or platform.machine()})",
            "device_kind": "gpu" if b.cuda else "cpu", "loadavg": [load_before, os.getloadavg()[0]],
            "device_memory_gib": (torch.cuda.get_device_properties(b.device).total_memory / 2**30) if b.cuda else None,
            "fp32_matmul": fp32_matmul, "host_memory": host_memory,
            "timer": "cuda events" if b.cuda else "wall clock (perf_counter), CPU time for loss/top-k/framework overheads",
        }
        with open(args.out, "w") as f:
            json.dump(raw, f, indent=1)
    dist.barrier()
    close_process_group()


if __name__ == "__main__":
    main()
