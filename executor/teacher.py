"""Where the teacher runs and how its outputs reach the student: the three placements.

Routing is static and the same for all three (kdplan.schema.capability.target_route: which teacher
dp group serves which student shard, and which rank sends its targets to which).

- co-located: teacher and student share ranks; each step starts with a teacher phase (forward
  under no_grad for every micro-batch, collective over the teacher groups), then the student
  trains. Outputs are encoded and decoded only if the plan compresses them, or if some of them
  cross a link (then every receiver of a shard decodes the same payload, so tp ranks agree).
- disaggregated: teacher ranks loop over steps and micro-batches on their own, at most
  ``kd.max_in_flight`` micro-batches ahead of the student (a send must complete before the
  micro-batch that far ahead is computed), and isend compressed payloads; student ranks post
  irecvs ahead and never run the teacher.
- offline: before training, the teacher ranks write each sample's compressed outputs once to
  ``<output_dir>/<plan>/teacher_outputs/<key>/<sample hash>.safetensors`` (executor.teacher_cache:
  key = teacher weights by sha256, compression, temperature, ...; every file checked when read);
  over several epochs the pass covers the first epoch it meets and later epochs read the cache;
  any layout, resharding, resume or rerun finds the files by content hash.
- online_then_cache (prediction.job.strategy; co-located online): the steps holding a sample the
  cache lacks run the teacher online and write those samples as the student trains (the same
  files and bytes as the offline pass, in the background: teacher_cache.CacheWriter); every
  other step reads the cache as offline does (Targets.plan_cache).
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from kdplan.schema import Plan
from kdplan.schema.capability import target_route

from .kd.compression import Payload, decode, encode, row_offsets
from .kd.grad_hooks import ByteCounter
from .kd.losses import TeacherTarget, prepare_target
from .measure import StepTimer
from .mesh import RoleMesh


def shared_vocab_logits(logits: torch.Tensor, kd_vocab: int, student_vocab: int) -> torch.Tensor:
    """Teacher logits [N, V_teacher] over the student's table [N, student_vocab]: ids [0, kd_vocab)
    (the tokenizer both share, plan.kd.vocab_size) kept, the rest -inf (zero teacher probability:
    padding rows of either table are no token of the tokenizer, so KD over the student's table
    then compares the two models over the shared ids). No copy when the tables already agree."""
    if logits.shape[-1] == student_vocab == kd_vocab:
        return logits
    out = logits.new_full((logits.shape[0], student_vocab), float("-inf"))
    out[:, :kd_vocab] = logits[:, :kd_vocab]
    return out


class TeacherRunner:
    """Forward-only teacher on this rank's tp x pp group; stages pass hidden states by p2p."""

    def __init__(self, stage, tmesh: RoleMesh, hidden_size: int, counter: ByteCounter, device: torch.device,
                 dtype: torch.dtype = torch.float32, gather_bytes: float = 0.0):
        self.stage, self.mesh, self.h, self.counter = stage, tmesh, hidden_size, counter
        self.sp = getattr(stage, "sp_degree", 1)
        self.device, self.dtype = device, dtype  # weights and activations stored and run in ``dtype``
        self.gather_bytes = gather_bytes  # teacher.zero = 3: weights all-gathered over dp per forward

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T] ids -> [B, T, V] logits on the last stage, None elsewhere (a collective)."""
        m = self.mesh
        p, d, t = m.coord()
        x = ids.to(self.device)
        if p > 0:
            x = torch.empty(ids.shape[0], ids.shape[1] // self.sp, self.h, device=self.device, dtype=self.dtype)
            _p2p([dist.P2POp(dist.irecv, x, m.rank_at(p - 1, d, t))])
        with torch.autocast(self.device.type, enabled=False):  # bf16 weights compute in bf16 as they are
            out = self.stage(x)
        if self.gather_bytes:
            self.counter.add("teacher_params", self.gather_bytes)
        if p < m.pp - 1:
            _p2p([dist.P2POp(dist.isend, out.contiguous(), m.rank_at(p + 1, d, t))])
            self.counter.add("pipeline", out.numel() * out.element_size())
            return None
        return out


class WeightStream:
    """``teacher.layout.offload = "weights"``: the teacher's block weights live in host memory
    (pinned on CUDA) and reach the device block by block, as the cost model prices it (PCIe
    traffic, reported in bytes_per_step["offload"]): the copy of the next block is issued on a
    side stream while the current block computes (one ahead; after the last block, the first
    block of the next forward), and a block's device copy is dropped once it has run, so the
    device holds at most two blocks' weights. Embeddings, final norm and head stay on the device.
    On a CPU run the "device" copy is a real copy too, so the bytes are counted the same way."""

    def __init__(self, model, device: torch.device, counter: ByteCounter):
        from .parallelize import blocks
        self.blocks, self.device, self.counter = blocks(model), device, counter
        cuda = device.type == "cuda"
        self.host = []
        for blk in self.blocks:
            entries = []
            for p in [*blk.parameters(), *blk.buffers()]:  # a quantized teacher's weights are buffers
                h = p.data.detach().to("cpu")
                entries.append((p, h.pin_memory() if cuda else h))
                p.data = torch.empty(0, dtype=p.dtype, device=device)
            self.host.append(entries)
        model.to(device)  # what stays resident: embeddings, norm, head, buffers
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.ready: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.block_bytes = [sum(h.numel() * h.element_size() for _, h in e) for e in self.host]
        for i, blk in enumerate(self.blocks):
            blk.register_forward_pre_hook(lambda mod, args, i=i: self._before(i))
            blk.register_forward_hook(lambda mod, args, out, i=i: self._after(i))

    def _fetch(self, i: int) -> None:
        if i in self.ready:
            return
        if self.stream is None:
            self.ready[i] = ([h.clone() for _, h in self.host[i]], None)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[i] = (copies, event)
        self.counter.add("offload", self.block_bytes[i])

    def _before(self, i: int) -> None:
        self._fetch(i)
        copies, event = self.ready.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for c in copies:
                c.record_stream(compute)  # made on the side stream, used on this one
        for (p, _), c in zip(self.host[i], copies):
            p.data = c
        self._fetch((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        for p, _ in self.host[i]:
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)


class Targets:
    """Teacher targets for this student rank, by (step, micro-batch)."""

    def __init__(self, plan: Plan, *, tmesh: RoleMesh | None, smesh: RoleMesh, runner: TeacherRunner | None,
                 microbatch, n_micro: int, vocab_size: int, counter: ByteCounter, cache_dir: Path | None = None,
                 cache_key: str = ""):
        self.plan, self.tmesh, self.smesh, self.runner = plan, tmesh, smesh, runner
        self.microbatch, self.n_micro, self.V, self.counter = microbatch, n_micro, vocab_size, counter
        self.compression = plan.kd.compression
        self.T = plan.kd.temperature
        self.mode, self.placement = plan.kd.mode, plan.kd.placement
        self.route = target_route(plan)  # the one routing rule (the planner's capability table reads it too)
        self.rank = smesh.rank
        self.cache_dir, self.cache_key = cache_dir, cache_key  # offline: executor.teacher_cache
        self.device = runner.device if runner is not None else torch.device(
            "cuda", torch.cuda.current_device()) if plan.job.device_kind == "gpu" else torch.device("cpu")
        self.store: dict[tuple[int, int], TeacherTarget] = {}
        self._chunks: dict[tuple[int, int, int], list] = {}  # (step, teacher group, chunk) -> [logits, rows left]
        self.pending: dict[tuple[int, int], tuple[Payload, list]] = {}
        # online_then_cache (plan_cache): the steps that run the teacher online (None: every step),
        # the samples this rank writes, its background writer, and whether a write awaits _sync_writes
        self.online_steps: set[int] | None = None
        self._need: set[str] = set()
        self.last_online_step = -1
        self.writer = None
        self._dirty = False
        self.cache_write_bytes = 0  # payload bytes this rank wrote (or queued) to the cache (Measured.cache_write_bytes)
        self.wait_s = 0.0  # time this rank blocked on teacher outputs (reset by the caller)
        self.idle_s = 0.0  # teacher side: time blocked on back-pressure

    # ---- who does what ----------------------------------------------------------------------
    @property
    def my_shard(self) -> int | None:
        """Student dp shard whose targets this rank consumes (last student stage only)."""
        s = self.smesh
        if not s.member or s.pp_rank != s.pp - 1:
            return None
        return s.dp_rank

    def _my_teacher_shards(self) -> list[int]:
        t = self.tmesh
        return self.route.shards_of_group(t.dp_rank) if t.member else []

    def _must_roundtrip(self, d: int) -> bool:
        remote = any(r != self.route.sender[d] for r in self.route.receivers[d])
        return self.compression.kind != "dense" or remote

    # ---- producing ------------------------------------------------------------------------
    def _produce(self, step: int, m: int, d: int):
        """[N, V] teacher logits of student micro-batch ``m`` of shard ``d`` on the teacher
        group's last stage (None elsewhere; a collective over the group).

        The teacher runs its own micro-batch (``teacher.layout.micro_batch``, as the cost model
        prices it): the rows of a step that teacher group ``g`` serves (its student shards, in
        order) are cut into chunks of that many sequences; each chunk runs once, when a student
        micro-batch first needs it, and is kept until all its rows have been served. Every rank
        of the group asks for the same micro-batches in the same order, so they run the same
        chunks in the same order."""
        smb, tmb = self.plan.student.layout.micro_batch, self.plan.teacher.layout.micro_batch
        if tmb == smb:
            ids, _, _ = self.microbatch(step, d, m)
            out = self.runner.logits(ids)
            return None if out is None else self._shared(out.reshape(-1, out.shape[-1]))
        g = self.route.group_of_shard[d]
        shards = self.route.shards_of_group(g)
        per_shard = self.n_micro * smb
        total = per_shard * len(shards)
        lo = shards.index(d) * per_shard + m * smb
        parts = []
        for c in range(lo // tmb, (lo + smb - 1) // tmb + 1):
            key = (step, g, c)
            if key not in self._chunks:
                rows = torch.cat([self.microbatch(step, x, mm)[0] for x in shards for mm in range(self.n_micro)])
                chunk = rows[c * tmb:min((c + 1) * tmb, total)]
                self._chunks[key] = [self.runner.logits(chunk), len(chunk)]
            out, left = self._chunks[key]
            a, b = max(lo, c * tmb) - c * tmb, min(lo + smb, (c + 1) * tmb) - c * tmb
            if out is not None:
                parts.append(out[a:b])
            self._chunks[key][1] = left - (b - a)
            if self._chunks[key][1] == 0:
                del self._chunks[key]
        if not parts:
            return None
        out = torch.cat(parts)
        return self._shared(out.reshape(-1, out.shape[-1]))

    def _shared(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's [N, V_teacher] logits over the student's table, KD's ids kept
        (shared_vocab_logits, plan.kd.vocab_size)."""
        return shared_vocab_logits(logits, self.plan.kd.vocab_size or self.V, self.V)

    def _deliver(self, step: int, m: int, d: int, logits: torch.Tensor, sends: list) -> None:
        if self.rank != self.route.sender[d]:
            return
        if not self._must_roundtrip(d):
            self.store[(step, m)] = TeacherTarget.dense(logits)
            return
        payload = encode(logits, self.compression, temperature=self.T, offsets=self._offsets(step, d, m, logits))
        for r in self.route.receivers[d]:
            if r == self.rank:
                self.store[(step, m)] = decode(payload, self.V)
                continue
            sends.extend(dist.batch_isend_irecv([dist.P2POp(dist.isend, t, r) for t in payload.tensors()]))
            self.counter.add("teacher_outputs", payload.nbytes)

    def _offsets(self, step: int, d: int, m: int, logits: torch.Tensor) -> torch.Tensor | None:
        """Sampled formats: the systematic-sampling offsets of micro-batch ``m`` of shard ``d``, a
        function of each sample's content hash and position (``row_offsets``), so every placement
        and layout draws the same ids for a sample (and the offline cache holds those)."""
        if not self.compression.sampled:
            return None
        return row_offsets(self.microbatch(step, d, m)[2], self.seq_len, device=logits.device)

    def _post_recv(self, step: int, m: int) -> None:
        d = self.my_shard
        if d is None or (step, m) in self.pending or (step, m) in self.store:
            return
        if self.route.sender[d] == self.rank:
            return
        n = self.plan.student.layout.micro_batch * self.seq_len
        p = Payload.empty(n, self.V, self.compression, temperature=self.T, device=self.device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, t, self.route.sender[d]) for t in p.tensors()])
        self.pending[(step, m)] = (p, works)

    def teacher_phase(self, step: int) -> None:
        """Co-located: every rank runs its teacher group for all micro-batches of ``step``
        (online_then_cache: on its online steps, writing what the cache lacks; other steps read
        the cache in ``get``)."""
        if self.online_steps is not None:
            if step not in self.online_steps:
                self._sync_writes()
                return
            self._dirty = True
        sends = []
        for m in range(self.n_micro):
            self._post_recv(step, m)
        for m in range(self.n_micro):
            for d in self._my_teacher_shards():
                logits = self._produce(step, m, d)
                if logits is None:
                    continue
                if self.online_steps is not None:
                    self._deliver_and_write(step, m, d, logits, sends)
                else:
                    self._deliver(step, m, d, logits, sends)
        for w in sends:
            w.wait()

    def teacher_loop(self, start: int, steps: int) -> None:
        """Disaggregated teacher ranks: produce and send, bounded by kd.max_in_flight."""
        window = deque()
        for step in range(start, start + steps):
            for m in range(self.n_micro):
                while len(window) >= self.plan.kd.max_in_flight:
                    with StepTimer(self.device) as idle:  # Work.wait() alone does not block on NCCL
                        for w in window.popleft():
                            w.wait()
                    self.idle_s += idle.elapsed_s
                sends = []
                for d in self._my_teacher_shards():
                    logits = self._produce(step, m, d)
                    if logits is not None:
                        self._deliver(step, m, d, logits, sends)
                window.append(sends)
        for sends in window:
            for w in sends:
                w.wait()

    # ---- offline ----------------------------------------------------------------------------
    def _first_sightings(self, start: int, steps: int, data) -> list[tuple[int, int, int]]:
        """The (step, micro-batch, shard) of steps [start, start + steps) that hold a row (of
        ``data``, train.Data) not met earlier in the walk, in run order: over a fixed dataset the
        walk stops after the first epoch it covers."""
        items, seen = [], torch.zeros(data.num_rows, dtype=torch.bool, device="cpu")  # host: data's row ids
        left = data.num_rows
        for step in range(start, start + steps):
            for m in range(self.n_micro):
                for d in range(self.smesh.dp):
                    idx = data.rows(step, d, m)
                    new = int((~seen[idx]).sum())
                    if new:
                        items.append((step, m, d))
                        seen[idx] = True
                        left -= new
            if left == 0:
                break
        return items

    def _missing(self, items: list[tuple[int, int, int]]) -> tuple[list[int], set[str], int]:
        """Which of ``items`` some sender must (re)write: (a flag per item, agreed by every rank
        through one all-reduce; the samples this rank must write; the samples it found whole). Each
        item's sender (route.sender) checks its samples' files (teacher_cache.check_sample: a damaged
        one is named on stderr and rewritten)."""
        from .teacher_cache import CacheDamaged, check_sample
        mine = set(self._my_teacher_shards())
        need: set[str] = set()  # samples this rank (a sender) must write
        flags = torch.zeros(len(items), dtype=torch.int32, device="cpu")
        found = 0
        for i, (step, m, d) in enumerate(items):
            if d not in mine or self.rank != self.route.sender[d]:
                continue
            for h in self.microbatch(step, d, m)[2]:
                if h in need:
                    flags[i] = 1
                    continue
                try:
                    check_sample(self.cache_dir, h, **self._cache_args())
                    found += 1
                except CacheDamaged as e:
                    if "missing" not in str(e):
                        print(f"teacher-output cache: {e}; rewriting it", file=sys.stderr, flush=True)
                    need.add(h)
                    flags[i] = 1
        flags = flags.to(self.device)  # the run's device: NCCL on GPUs, like every collective of the run
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist(), need, found

    def _row_payloads(self, step: int, m: int, d: int, logits: torch.Tensor, only: set[str] | None = None):
        """[(sample hash, payload)] of micro-batch ``m`` of shard ``d``: each sample's rows encoded
        on their own (sampled formats: offsets of that sample alone), as the cache stores them;
        ``only``: those samples alone."""
        hashes = self.microbatch(step, d, m)[2]
        rows = logits.view(len(hashes), -1, logits.shape[-1])
        out = []
        for h, row in zip(hashes, rows):
            if only is not None and h not in only:
                continue
            offsets = row_offsets([h], self.seq_len, device=row.device) if self.compression.sampled else None
            out.append((h, encode(row, self.compression, temperature=self.T, offsets=offsets)))
        return out

    def offline_pass(self, start: int, steps: int, data) -> tuple[int, int]:
        """Make sure every sample of steps [start, start + steps) has a whole cache file; returns
        (samples this rank wrote, samples it found cached). A collective over all ranks.

        The pass runs the micro-batches of ``_first_sightings`` (the first epoch it covers: every
        later epoch reads what it wrote) whose samples some sender needs (``_missing``, agreed by
        all ranks, so all ranks of a teacher group run the same forwards; with teacher.zero = 3,
        whole steps: every dp group runs as many)."""
        from .teacher_cache import write_sample
        n_shards, mine = self.smesh.dp, set(self._my_teacher_shards())
        items = self._first_sightings(start, steps, data)
        flags, need, found = self._missing(items)
        todo = [it for it, f in zip(items, flags) if f]
        if self.plan.teacher.layout.zero >= 3:  # sharded weights: every dp group runs whole steps
            todo = [(s, m, d) for s in sorted({s for s, _, _ in todo}) for m in range(self.n_micro)
                    for d in range(n_shards)]
        written = 0
        for step, m, d in todo:
            if d not in mine:
                continue
            logits = self._produce(step, m, d)
            if logits is None or self.rank != self.route.sender[d]:
                continue
            for h, payload in self._row_payloads(step, m, d, logits, only=need):
                write_sample(self.cache_dir, h, payload, self.cache_key)
                self.cache_write_bytes += payload.nbytes
                need.discard(h)
                written += 1
        return written, found

    # ---- online_then_cache: the online epoch writes the cache ---------------------------------
    def plan_cache(self, start: int, steps: int, data) -> tuple[int, int]:
        """online_then_cache (capability.writes_cache_online): which steps of [start, start + steps)
        run the teacher online and write what the cache lacks, and which read the cache. A
        collective over all ranks, once before training; returns (samples this rank will write,
        samples it found cached).

        A step runs online when it holds the first sighting in this run of a sample some sender
        found missing or damaged (``_missing``: every rank agrees), all its micro-batches; each
        sender writes those samples (``CacheWriter``: in the background, the same files and bytes
        as ``offline_pass``). Every other step reads the cache, as offline does: its samples were
        found whole, or written by an earlier online step (made visible first: ``_sync_writes``).
        A restart (or a rerun) checks again: what an interrupted run left unwritten is written
        online, never read half-written (each file is renamed into place whole)."""
        from .teacher_cache import CacheWriter
        items = self._first_sightings(start, steps, data)
        flags, need, found = self._missing(items)
        self.online_steps = {s for (s, _, _), f in zip(items, flags) if f}
        self._need = need
        self.last_online_step = max(self.online_steps, default=start - 1)
        self.writer = CacheWriter(self.cache_dir, self.cache_key)
        return len(need), found

    def _from_cache(self, step: int) -> bool:
        return self.mode == "offline" or (self.online_steps is not None and step not in self.online_steps)

    def _deliver_and_write(self, step: int, m: int, d: int, logits: torch.Tensor, sends: list) -> None:
        """online_then_cache's sender: the samples the cache lacks to the writer, and the targets
        delivered as online. A sender that is the shard's only receiver (co-located, nothing crosses
        a link) and compresses decodes the per-sample payloads it writes, as a later read of the
        cache would (the same targets, one encode)."""
        if self.rank != self.route.sender[d]:
            return
        local = self.route.receivers[d] == [self.rank] and self.compression.kind != "dense"
        rows = self._row_payloads(step, m, d, logits, only=None if local else self._need)
        for h, payload in rows:
            if h in self._need:
                self.writer.put(h, payload)
                self.cache_write_bytes += payload.nbytes
                self._need.discard(h)
        if local:
            self.store[(step, m)] = TeacherTarget.cat([decode(p, self.V) for _, p in rows])
        else:
            self._deliver(step, m, d, logits, sends)

    def _sync_writes(self) -> None:
        """Before the first cache step after online steps: every rank's files renamed into place
        (its writer flushed), then one all-reduce, so no rank reads a sample another rank is still
        writing. Every rank calls it at the same steps (online_steps is agreed)."""
        if not self._dirty:
            return
        self.writer.flush()
        dist.all_reduce(torch.zeros(1, device=self.device))
        self._dirty = False

    def finish_cache(self) -> int:
        """online_then_cache, end of the run: every pending file written (errors raised); returns
        the files this rank wrote."""
        if self.writer is None:
            return 0
        self.writer.close()
        return self.writer.written

    def _cache_args(self) -> dict:
        return dict(key=self.cache_key, n=self.seq_len, vocab_size=self.V, compression=self.compression,
                    temperature=self.T)

    def _read_offline(self, step: int, m: int) -> TeacherTarget:
        """The micro-batch's targets from the cache, each file checked in full (sha256): a
        damaged one is removed and raises teacher_cache.CacheDamaged, so the run stops and the
        offline pass of its restart (or of `kdplan run --resume`) rewrites it."""
        from .teacher_cache import CacheDamaged, path_of, read_sample
        _, _, hashes = self.microbatch(step, self.my_shard, m)
        parts = []
        for h in hashes:
            try:
                p = read_sample(self.cache_dir, h, **self._cache_args())
            except CacheDamaged as e:
                path_of(self.cache_dir, h).unlink(missing_ok=True)
                raise CacheDamaged(f"{e}; removed it: the offline pass of a restart (or of --resume) rewrites"
                                   " it") from None
            self.counter.add_tensors("teacher_outputs_disk", p.tensors())
            p.data = [t.to(self.device, non_blocking=True) for t in p.data]  # decoded on the run's device
            parts.append(decode(p, self.V))
        return TeacherTarget.cat(parts)

    # ---- consuming --------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.plan.job.seq_len

    def prefetch(self, step: int, m: int) -> None:
        """Disaggregated: keep irecvs posted up to max_in_flight micro-batches ahead."""
        if self.placement != "disaggregated" or self.mode == "offline":
            return
        k = step * self.n_micro + m
        for j in range(k, k + self.plan.kd.max_in_flight):
            self._post_recv(j // self.n_micro, j % self.n_micro)

    def get(self, step: int, m: int) -> TeacherTarget:
        """The target of (step, m); kept until ``done(step)`` because the pipeline's shape
        inference calls the loss once more on the first step."""
        key = (step, m)
        if key not in self.store:
            with StepTimer(self.device) as wait:  # Work.wait() alone does not block on NCCL
                cached = self._from_cache(step)
                if cached:
                    self.store[key] = self._read_offline(step, m)
                else:
                    self.prefetch(step, m)
                    p, works = self.pending.pop(key)
                    for w in works:
                        w.wait()
            if not cached:
                self.store[key] = decode(p, self.V)
            self.wait_s += wait.elapsed_s
        return self.store[key]

    def fetch_all(self, step: int) -> None:
        """Every micro-batch's target of ``step`` into the store now (offline: read from the cache;
        otherwise received), so that the students of a run with several read them from memory,
        and the read counts as the step's shared teacher-target work, not as the first student's."""
        if self.my_shard is None:
            return
        for m in range(self.n_micro):
            self.get(step, m)

    def prepare(self, step: int, *, dtype: torch.dtype = torch.float32) -> None:
        """Several students: the teacher's side of the KD loss for every stored target of ``step``,
        computed once (kd.losses.prepare_target) for all the students of the run that read them (the
        same temperature, vocabulary and format: one plan.kd). The prepared targets replace the raw
        ones: a dense bf16 target's bytes double (float32), for every micro-batch of the step at once.
        (One student prepares each micro-batch's target in its loss, executor.train._kd: one
        micro-batch's float32 target at a time.)"""
        for key in [k for k in self.store if k[0] == step]:
            self.store[key] = prepare_target(self.store[key], temperature=self.T, vocab_size=self.V, dtype=dtype)

    def done(self, step: int) -> None:
        for key in [k for k in self.store if k[0] <= step]:
            del self.store[key]


def _p2p(ops: list) -> None:
    """Blocking point-to-point through ``batch_isend_irecv`` (one NCCL group call)."""
    for w in dist.batch_isend_irecv(ops):
        w.wait()
