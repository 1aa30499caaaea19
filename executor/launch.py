"""Entry point under torchrun: ``python -m executor.launch PLAN --steps N --report FILE``.

Order: read the plan (the only thing read from the planner), derive the baseline layout if
asked, refuse a plan that does not match this launch (world size, device, schema version,
models, and the run a --resume would continue: executor.runs) with one line and exit 2 BEFORE
any process group exists, prepare the inputs (tokenizer,
packed data, teacher checkpoint: the first process does the work under a file lock, the others
then read the cache), init the process group, train, write the report.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from kdplan.schema import SCHEMA_VERSION, Plan, schema_version_error
from kdplan.schema.capability import students_one_after_another, unsupported, writes_cache_online
from kdplan.schema.plan import BASELINE_FIELDS

from .runs import Refused  # the plan does not match this launch (exit 2, one line)

BASELINES = tuple(BASELINE_FIELDS)
TIMEOUT_FLOOR_S = 120.0  # process start-up, first-step warm-up and shape inference on 2 shared cores
STARTUP_FLOOR_S = 60.0  # collectives also cover process start-up (imports on a loaded machine)


MAX_PLAN_BYTES = 64 * 1024 * 1024


def load_plan(path: str) -> Plan:
    try:
        with open(path, "rb") as f:  # bounded: a plan is never this large, /dev/zero never ends
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise Refused(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise Refused(f"{path}: larger than {MAX_PLAN_BYTES} bytes; not a plan")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Refused(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise Refused(f"{path}: nesting too deep") from None
    if isinstance(data, dict):  # older minors of this major run (their later fields have defaults)
        if "schema_version" not in data:
            raise Refused(f"{path}: no schema_version: not a plan written by kdplan (this executor reads"
                          f" schema {SCHEMA_VERSION} and older {SCHEMA_VERSION.split('.')[0]}.x)")
        if why := schema_version_error(data["schema_version"], kind="plan", reader="executor"):
            raise Refused(f"{path}: {why}")
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise Refused(f"{path}: field '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    except (ValueError, TypeError, RecursionError) as e:
        raise Refused(f"{path}: {e}") from None


def derive_baseline(plan: Plan, kind: str | None) -> Plan:
    """The plan itself, or baseline ``kind``'s (Plan.baseline: the layouts the plan priced)."""
    if kind is None:
        return plan
    if plan.kd.signal != "logits":  # its baselines are the student's step alone, with no teacher
        raise Refused(f"--baseline {kind}: kd.signal = {plan.kd.signal}: a sequence-level plan's baselines price "
                      "the student's cross-entropy step only; plan the student with --teacher none to run that")
    try:
        return plan.baseline(kind)
    except ValueError as e:
        raise Refused(f"--baseline {kind}: {e}") from None


# ---- the checks that run before any process group exists ------------------------------------

def check(plan: Plan, *, world_size: int, device: str) -> None:
    if world_size != plan.world_size:
        raise Refused(f"the plan needs {plan.world_size} processes but this launch has WORLD_SIZE={world_size}"
                      f" (use torchrun --nproc_per_node={plan.world_size}, or `kdplan run` which does)")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise Refused("the plan runs on GPUs (device_kind gpu) but CUDA is not available here;"
                          " plan for the cpu-local cluster or pass --device cpu")
    for what, p in (("data", plan.run.data), ("tokenizer", plan.run.tokenizer),
                    ("teacher checkpoint", plan.run.teacher_checkpoint),
                    ("student checkpoint", plan.run.student_checkpoint)):
        if p and not Path(p).exists():
            raise Refused(f"{what} {p}: no such file or directory")
    # what this executor does not run: one table, which the planner reads too (Plan.executor)
    if found := unsupported(plan):
        raise Refused(str(found[0]))
    s, t = plan.student, plan.teacher
    roles = [("student", s)] + [(f"extra_students[{i}]", r) for i, r in enumerate(plan.extra_students)] \
        + ([("teacher", t)] if t else [])
    for name, role in roles:
        m, lay = role.model, role.layout
        if m.num_heads % lay.tp or m.num_kv_heads % lay.tp:
            raise Refused(f"{name}: tp={lay.tp} does not divide {m.num_heads} heads / {m.num_kv_heads} kv heads")
        if lay.pp * (lay.virtual_stages if name != "teacher" else 1) > m.num_layers:
            raise Refused(f"{name}: {lay.pp} pipeline stages for {m.num_layers} layers")
        if lay.stages:
            bounds = [(st.first_layer, st.last_layer) for st in lay.stages]
            flat = [b for pair in bounds for b in pair]
            if flat[0] != 0 or flat[-1] != m.num_layers or any(a >= b for a, b in bounds) or \
                    any(bounds[i][1] != bounds[i + 1][0] for i in range(len(bounds) - 1)):
                raise Refused(f"{name}: pipeline stages {bounds} do not cut layers 0..{m.num_layers} into"
                              " contiguous, non-empty ranges")
        ranks = lay.ranks or []
        if any(not 0 <= r < world_size for r in ranks):
            raise Refused(f"{name}: layout ranks {ranks} lie outside the world of {world_size}")
        # each stage's ranks, when listed, must be those the mesh gives that stage: (pp, dp, tp)
        # order, tp innermost; virtual stage i runs on pipeline rank i % pp
        from .mesh import role_ranks
        mine = role_ranks(plan)[0 if name == "teacher" else 1]
        per = lay.dp * lay.tp
        for i, st in enumerate(lay.stages):
            want = sorted(mine[(i % lay.pp) * per:(i % lay.pp + 1) * per])
            if st.ranks and sorted(st.ranks) != want:
                raise Refused(f"{name}.layout.stages[{i}].ranks = {st.ranks}, but its pipeline rank runs on"
                              f" ranks {want} (layout.ranks in (pp, dp, tp) order): re-plan")
    for name, r in [("student", s)] + [(f"extra_students[{i}]", r) for i, r in enumerate(plan.extra_students)]:
        if plan.job.global_batch % (r.layout.dp * r.layout.micro_batch):
            raise Refused(f"global batch {plan.job.global_batch} is not divisible by {name} dp x micro-batch"
                          f" = {r.layout.dp} x {r.layout.micro_batch}")
    if t is not None:
        kd_vocab = plan.kd.vocab_size or s.model.vocab_size
        if kd_vocab > min(t.model.vocab_size, s.model.vocab_size):
            raise Refused(f"KD over vocabulary ids [0, {kd_vocab}) but the teacher's table has {t.model.vocab_size} "
                          f"rows and the student's {s.model.vocab_size}")
        if t.model.vocab_size != s.model.vocab_size and plan.kd.vocab_size is None:
            raise Refused(f"teacher vocabulary {t.model.vocab_size} != student vocabulary {s.model.vocab_size} "
                          "and the plan names no shared vocabulary (kd.vocab_size)")
        from .mesh import role_ranks
        tr, sr = role_ranks(plan)
        if plan.kd.mode == "online" and plan.kd.placement == "disaggregated" and set(tr) & set(sr):
            raise Refused(f"disaggregated teacher ranks {tr} overlap student ranks {sr}")
        if len(set(tr) | set(sr)) != world_size:
            raise Refused(f"teacher ranks {tr} and student ranks {sr} do not cover the {world_size} processes")
        if plan.kd.placement == "disaggregated" and t.layout.dp > s.layout.dp:
            raise Refused(f"teacher dp {t.layout.dp} exceeds student dp {s.layout.dp}: some teacher groups would idle")
        for ck, spec in ((plan.run.teacher_checkpoint, t.model), (plan.run.student_checkpoint, s.model)):
            if ck:
                _check_config(ck, spec)
    elif len(set(s.layout.ranks or range(s.layout.num_gpus))) != world_size:
        raise Refused(f"student ranks do not cover the {world_size} processes")


def _check_config(ckpt: str, spec) -> None:
    cfg_path = Path(ckpt) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Refused(f"{cfg_path}: cannot read the checkpoint's config ({e})") from None
    want = {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers, "vocab_size": spec.vocab_size,
            "num_attention_heads": spec.num_heads}
    for k, v in want.items():
        if cfg.get(k) != v:
            raise Refused(f"{cfg_path}: {k} = {cfg.get(k)} but the plan's model has {v}")


# ---- inputs, prepared once under a file lock ---------------------------------------------------

def prepare(plan: Plan, out_dir: Path):
    """Tokenizer, packed rows and the teacher checkpoint: made by whichever process gets the lock
    first, read from the cache by the others (no collective: pre-training can take minutes)."""
    import torch
    from .data import dataset_rows, get_tokenizer, load_texts, pack, split_heldout, texts_hash, tokenize
    from .teacher_cache import weights_sha256
    from .train import RunInputs

    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        texts = load_texts(plan.run.data)
        # Token ids must exist in both tables: the shared vocabulary KD runs over (plan.kd.vocab_size).
        V = (plan.kd.vocab_size if plan.teacher is not None else None) or plan.student.model.vocab_size
        tok = get_tokenizer(tokenizer_dir=plan.run.tokenizer, texts=texts, vocab_size=V, cache_dir=str(cache))
        if len(tok) > V:
            raise Refused(f"tokenizer has {len(tok)} tokens but the models' shared vocabulary is {V}")
        rows_file = cache / f"rows-{texts_hash(texts)[:16]}-{len(tok)}-{plan.job.seq_len}.pt"
        if rows_file.exists():
            rows = torch.load(rows_file, weights_only=True)
        else:
            rows = pack(tokenize(texts, tok), plan.job.seq_len)
            torch.save(rows, rows_file.with_suffix(".tmp"))
            os.replace(rows_file.with_suffix(".tmp"), rows_file)
        train_rows, heldout = split_heldout(rows)
        teacher_ckpt, key = None, ""
        if plan.teacher is not None:
            teacher_ckpt = plan.run.teacher_checkpoint or _pretrain(plan, train_rows, heldout, cache, tok)
            _check_teacher_vocab(teacher_ckpt, tok)
            # the cache's teacher identity: its weights, by content
            if plan.kd.mode == "offline" or writes_cache_online(plan):
                key = weights_sha256(teacher_ckpt, memo_dir=cache)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return RunInputs(rows=dataset_rows(train_rows, plan.job.dataset_tokens, seq_len=plan.job.seq_len,
                                       global_batch=plan.job.global_batch),
                     teacher_checkpoint=teacher_ckpt, student_checkpoint=plan.run.student_checkpoint,
                     out_dir=out_dir, teacher_key=key)


def _pretrain(plan: Plan, rows, heldout, cache: Path, tok) -> str:
    try:
        from .pretrain import pretrain_teacher
    except ImportError:
        raise Refused("no teacher checkpoint given (run.teacher_checkpoint) and executor.pretrain is not"
                      " available to pre-train one") from None
    return str(pretrain_teacher(plan.teacher.model, rows, steps=plan.run.teacher_pretrain_steps,
                                seq_len=plan.job.seq_len, seed=plan.run.seed, cache_dir=cache, heldout=heldout,
                                tokenizer=tok))


def _check_teacher_vocab(ckpt: str, tok) -> None:
    """A teacher checkpoint that ships its own tokenizer must map tokens to the same ids as ours."""
    if (Path(ckpt) / "tokenizer.json").exists():
        from .data import get_tokenizer
        from .models import check_vocab
        try:
            check_vocab(get_tokenizer(tokenizer_dir=ckpt), tok)
        except ValueError as e:
            raise Refused(str(e)) from None


# ---- main ----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m executor.launch", description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=None,
                    help="the step the run ends at (default: the plan's run.steps); a resumed run continues to it")
    ap.add_argument("--report", default=None, help="report JSON path (default: <output_dir>/report.json)")
    ap.add_argument("--baseline", choices=BASELINES, default=None)
    ap.add_argument("--resume", action="store_true",
                    help="continue the earlier run of this plan, seed and data in the output directory (refused if none)")
    ap.add_argument("--output-dir", default=None, help="override the plan's run.output_dir")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="override the plan's device kind")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="override run.checkpoint_every")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="step timeout in seconds (default: from the plan); a rank stuck longer ends the run")
    ap.add_argument("--inject-kill", action="append", default=[], metavar="RANK:STEP",
                    help="rehearse a failure: that rank SIGKILLs itself at the start of that step (RANK:STEP:save: while"
                         " writing the checkpoint at its end), once per job")
    ap.add_argument("--inject-hang", action="append", default=[], metavar="RANK:STEP",
                    help="rehearse a hang: that rank stops answering at that step, once per job")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="refuse or accept the plan, then exit (no torch)")
    ap.add_argument("--dump-grads", default=None, help=argparse.SUPPRESS)  # tests: full gradients of the first step
    return ap.parse_args(argv)


def step_timeout_s(plan: Plan, override: float | None = None) -> float:
    """Longest one step (or one checkpoint save) may take on a rank before the watchdog ends the
    run: a few predicted steps, never below the floor; ``override`` (--timeout-s) replaces it."""
    from .faults import TIMEOUT_FLOOR_S as floor
    if override is not None:
        return max(floor, override)
    return max(TIMEOUT_FLOOR_S, 20.0 * plan.prediction.step_time_s)


def init_timeout_s(plan: Plan, steps: int, override: float | None = None) -> float:
    """Longest any rank may wait in one collective: twice the step timeout (the watchdog names a
    stuck rank first), never below start-up. Offline runs wait once for the whole teacher pass
    (monitored_barrier has its own timeout)."""
    t = max(STARTUP_FLOOR_S, 2.0 * step_timeout_s(plan, override))
    if plan.kd.mode == "offline" and plan.prediction.offline is not None:
        t += 20.0 * plan.prediction.offline.teacher_pass_s_per_step * steps
    return t


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = derive_baseline(load_plan(args.plan), args.baseline)
        if args.steps is not None and args.steps < 1:
            raise Refused(f"--steps must be >= 1, got {args.steps}")
        if args.timeout_s is not None and not args.timeout_s > 0:
            raise Refused(f"--timeout-s must be > 0 seconds, got {args.timeout_s}")
        from .faults import parse_points
        args.kills = parse_points(args.inject_kill, "--inject-kill")
        args.hangs = parse_points(args.inject_hang, "--inject-hang")
        if students_one_after_another(plan) and (args.kills or args.hangs or
                                                 int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
            raise Refused("elastic restarts and injected faults are not run for students one after another"
                          " (prediction.job.students_arrangement = one_after_another); run without them, or each"
                          " student's plan on its own")
        upd = {}
        if args.output_dir:
            upd["output_dir"] = args.output_dir
        if args.checkpoint_every is not None:
            upd["checkpoint_every"] = args.checkpoint_every
        if upd:
            plan = plan.model_copy(update={"run": plan.run.model_copy(update=upd)})
        device = args.device or ("cuda" if plan.job.device_kind == "gpu" else "cpu")
        if args.device:
            plan = plan.model_copy(update={"job": plan.job.model_copy(update={"device_kind": "gpu" if device == "cuda" else "cpu"})})
        world = plan.world_size if args.check_only else int(os.environ.get("WORLD_SIZE", "1"))
        check(plan, world_size=world, device=device)
        for r, *_ in args.kills + args.hangs:
            if r >= world:
                raise Refused(f"fault injection at rank {r}, but the run has {world} processes")
        out_dir = Path(plan.run.output_dir) / (args.baseline or "plan")
        from . import runs
        from .faults import attempt
        me = runs.identity(plan)
        run_dir, resume = runs.choose(out_dir / "checkpoints", me, resume=args.resume, attempt=attempt())
        if args.check_only:
            return 0
        steps = args.steps or plan.run.steps
        inputs = prepare(plan, Path(plan.run.output_dir))
        inputs.out_dir, inputs.checkpoint_dir = out_dir, run_dir
        runs.start(run_dir, me, rank=int(os.environ.get("RANK", "0")))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(plan, args, inputs, steps=steps, resume=resume, device=device)


def run(plan: Plan, args, inputs, *, steps: int, resume: bool, device: str) -> int:
    import torch
    import torch.distributed as dist

    from . import faults
    from . import report as rep
    from .mesh import close_process_group
    from .train import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if device == "cpu":  # host tensors kept between steps, as CUDA's caching allocator keeps device memory
        from .hostmem import retain_host_memory
        retain_host_memory()
    device_id = None
    if device == "cuda":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)
    timeout = datetime.timedelta(seconds=init_timeout_s(plan, steps, args.timeout_s))
    if "RANK" not in os.environ:  # plain `python -m executor.launch` for a one-process plan
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # On GPUs: NCCL for tensors, gloo for what stays on the host (object collectives: checkpoint
    # coordination, the final stats gather), so no host tensor ever reaches NCCL.
    _init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", timeout, device_id=device_id)
    rank = dist.get_rank()
    # under torchrun --max-restarts (or when rehearsing a fault) attempts are recorded, and a
    # restarted attempt resumes from the latest intact checkpoint by itself
    elastic = None
    if args.kills or args.hangs or faults.attempt() > 0 or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        elastic = faults.Elastic(inputs.out_dir, rank, kills=args.kills, hangs=args.hangs)
    watchdog = faults.Watchdog(rank, step_timeout_s(plan, args.timeout_s), inputs.out_dir)
    try:
        stats, start, end = train(plan, inputs, steps=steps, resume=resume, progress=not args.no_progress,
                                  dump_grads=args.dump_grads, elastic=elastic, watchdog=watchdog)
        if end <= start:
            if rank == 0:
                print(f"nothing to do: the run in {inputs.run_dir} is already at step {start}, at or past"
                      f" --steps {steps}", flush=True)
        elif rank == _writer(plan):
            name = torch.cuda.get_device_name() if device == "cuda" else "cpu (gloo)"
            report = rep.build(plan, args.plan, stats, baseline=args.baseline, device=name, steps=end - start,
                               restarts=elastic.restarts() if elastic is not None else [])
            path = Path(args.report or inputs.out_dir / "report.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(report.model_dump_json(indent=2) + "\n")
            os.replace(tmp, path)
            print(rep.render(report))
            print(f"report written to {path}")
    finally:
        close_process_group()
    return 0


def _init_process_group(backend: str, timeout: datetime.timedelta, device_id=None) -> None:
    """Under torchrun the workers share the agent's TCPStore, which outlives a restart: without a
    per-attempt key prefix the restarted workers read the dead attempt's addresses and hang.
    ``device_id`` (CUDA) binds the group to this rank's GPU, so NCCL creates its communicator now
    rather than at the first collective (the keyword exists since torch 2.3; dropped before)."""
    import inspect

    import torch.distributed as dist
    kw = {}
    if device_id is not None and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kw["device_id"] = device_id
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout, **kw)
        return
    from .faults import attempt
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"/kdplan/attempt_{attempt()}", store), rank=rank,
                            world_size=world, timeout=timeout, **kw)


def _writer(plan: Plan) -> int:
    """The rank that knows the loss: last student stage, dp 0, tp 0."""
    from .mesh import role_ranks
    s = plan.student.layout
    _, ranks = role_ranks(plan)
    return ranks[((s.pp - 1) * s.dp) * s.tp]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
