"""Resolve a job: job TOML + command-line flags -> models, cluster and validated pins.

``Problem`` is what the cost model, the solver and the simulator take: everything resolved,
nothing left as a string that could still be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InputError
from .io import explain_validation, load_model
from .models import is_none, kd_vocab_size, load_model_spec
from .profiles import load_cluster, scale_cluster
from .schema.cluster import ClusterProfile
from .schema.compression import Compression, parse_compression
from .schema.job import JobSpec
from .schema.model import ModelSpec

# --fix KEY=VALUE: key -> (parser, description). Values are parsed to their typed form.


def _pos_int(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {v!r}") from None
    if i < 1 or i > 1_000_000:
        raise ValueError(f"expected a positive integer (1..1000000), got {v!r}")
    return i


def _choice(*options: str):
    def parse(v: str) -> str:
        s = v.strip().lower()
        if s not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return s
    return parse


def _zero(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise ValueError(f"expected 0, 1, 2 or 3, got {v!r}") from None
    if i not in (0, 1, 2, 3):
        raise ValueError(f"expected 0, 1, 2 or 3, got {v!r}")
    return i


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _compression(v: str) -> str:
    return str(parse_compression(v))


def _gpu_name(v: str) -> str:
    """A GPU type or group name (``a100-80g``, ``group1``); checked against the cluster in resolve()."""
    s = v.strip().lower()
    if not s or not all(c.isalnum() or c in "-_." for c in s):
        raise ValueError(f"expected a GPU type (e.g. a100-80g, h100-80g) or a group (group0, group1, ...), got {v!r}")
    return s


FIX_KEYS: dict[str, tuple[Any, str]] = {
    "teacher.tp": (_pos_int, "teacher tensor-parallel degree"),
    "teacher.pp": (_pos_int, "teacher pipeline-parallel degree"),
    "teacher.dp": (_pos_int, "teacher data-parallel degree (replicas)"),
    "teacher.micro_batch": (_pos_int, "teacher micro-batch (sequences)"),
    "teacher.offload": (_choice("none", "weights"), "teacher weights in host memory"),
    "teacher.zero": (_choice("0", "3"), "teacher weights sharded over its dp group (3) or not (0)"),
    "teacher.gpu": (_gpu_name, "GPU type (or groupN) the teacher runs on, on a mixed cluster"),
    "teacher.precision": (_choice("bf16", "fp8", "int8"), "teacher forward precision (fp8/int8: quantized weights)"),
    "student.tp": (_pos_int, "student tensor-parallel degree"),
    "student.pp": (_pos_int, "student pipeline-parallel degree"),
    "student.dp": (_pos_int, "student data-parallel degree"),
    "student.zero": (_zero, "student ZeRO stage 0-3"),
    "student.micro_batch": (_pos_int, "student micro-batch (sequences)"),
    "student.recompute": (_choice("none", "selective", "full"), "activation recomputation"),
    "student.sequence_parallel": (_bool, "Megatron sequence parallelism"),
    "student.virtual_stages": (_pos_int, "model chunks per pipeline rank"),
    "student.offload": (_choice("none", "optimizer"), "optimizer state in host memory"),
    "student.grad_compression": (_choice("none", "int8"), "gradient all-reduce payload"),
    "student.gpu": (_gpu_name, "GPU type (or groupN) the student runs on, on a mixed cluster"),
    "kd.mode": (_choice("online", "offline"), "teacher during training or precomputed"),
    "kd.placement": (_choice("colocated", "disaggregated"), "teacher on student GPUs or its own"),
    "kd.compression": (_compression, "dense | topk:K | topk:K:BITS"),
}


def parse_fixes(items: dict[str, str] | list[str], source: str = "--fix") -> dict[str, Any]:
    """Validate pins. ``items`` is a list of KEY=VALUE strings or a mapping."""
    pairs: list[tuple[str, str]] = []
    if isinstance(items, dict):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        for it in items:
            if "=" not in it:
                raise InputError(f"{source} {it!r}: expected KEY=VALUE (keys: {', '.join(FIX_KEYS)})")
            k, v = it.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in ("teacher.ep", "student.ep"):
            raise InputError(f"{source} {k}={v}: expert parallelism is not planned yet; a mixture-of-experts "
                             "model keeps every expert on each rank, its widths split tp ways and its weights "
                             f"sharded over the dp group by FSDP (pin {k.split('.')[0]}.zero=3 for that)")
        if k not in FIX_KEYS:
            raise InputError(f"{source} {k!r}: unknown key; known: {', '.join(FIX_KEYS)}")
        try:
            val = FIX_KEYS[k][0](v)
        except ValueError as e:
            raise InputError(f"{source} {k}={v}: {e}") from None
        if k in out and out[k] != val:
            raise InputError(f"{source} {k} is pinned twice with different values ({out[k]} and {val})")
        out[k] = val
    return out


@dataclass
class Problem:
    """A fully resolved planning problem."""

    job: JobSpec
    teacher: ModelSpec | None
    student: ModelSpec
    cluster: ClusterProfile
    fixes: dict[str, Any] = field(default_factory=dict)
    job_path: str | None = None
    teacher_precisions: tuple[str, ...] = ("bf16",)
    """Teacher forward precisions the solver may choose (teacher_precision.allowed_teacher_precisions)."""
    kd_vocab_size: int | None = None
    """Token ids [0, V) the KD loss compares over (models.kd_vocab_size); the student's table
    when not given (no teacher, or a Problem built by hand)."""

    def __post_init__(self) -> None:
        if self.kd_vocab_size is None:
            self.kd_vocab_size = self.student.vocab_size

    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus

    @property
    def compressions(self) -> list[Compression] | None:
        if self.job.kd.allowed_compressions is None:
            return None
        return [parse_compression(c) for c in self.job.kd.allowed_compressions]


def load_job(path: str | None) -> JobSpec:
    if path is None:
        return JobSpec()
    return load_model(JobSpec, path)


# Command-line flag of each override key, so an error names what the user typed.
FLAGS = {"teacher": "--teacher", "student": "--student", "cluster": "--cluster", "gpus": "--gpus",
         "seq_len": "--seq-len", "global_batch": "--global-batch", "precision": "--precision",
         "tokens": "--tokens", "kd.min_topk": "--min-topk", "solver.objective": "--objective",
         "teacher_precision": "--teacher-precision"}


def resolve(job: JobSpec, *, overrides: dict[str, Any] | None = None, fixes: list[str] | None = None,
            job_path: str | None = None) -> Problem:
    """Apply command-line overrides to a job spec and resolve models, cluster and pins.

    Every error names where the bad value came from: the flag, or the job file and its field."""
    given = {k for k, v in (overrides or {}).items() if v is not None}
    file_fields = set(job.model_fields_set)

    def origin(key: str) -> str:
        if key in given:
            return FLAGS.get(key, key)
        return f"{job_path}: field '{key}'" if job_path else f"default {key}"

    data = job.model_dump()
    for k in given:
        v = overrides[k]
        if "." in k:
            a, b = k.split(".", 1)
            data[a][b] = v
        else:
            data[k] = v
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:  # the file alone was valid, so a flag is at fault
        first = e.errors()[0]
        key = ".".join(str(x) for x in first.get("loc", ()))
        raise InputError(f"{origin(key)} {overrides.get(key)!r}: {first.get('msg', 'invalid')}"
                         if key in given else str(explain_validation(e, job_path or "command line"))) from None
    for i, c in enumerate(job.kd.allowed_compressions or []):
        try:
            parse_compression(c)
        except ValueError as e:
            where = f"{job_path}: field" if job_path else "job field"
            raise InputError(f"{where} 'kd.allowed_compressions[{i}]': {e}") from None

    def blamed(key: str, fn, *args):
        try:
            return fn(*args)
        except InputError as e:
            if key in given and str(e).startswith(origin(key)):
                raise  # already names its flag ("--gpus 12 is not ...")
            raise InputError(f"{origin(key)}: {e}") from None

    job = _resolve_run_paths(job, job_path)
    teacher = None if is_none(job.teacher) else blamed("teacher", load_model_spec, _rel(job.teacher, job_path))
    student = blamed("student", load_model_spec, _rel(job.student, job_path))
    cluster = blamed("cluster", load_cluster, _rel(job.cluster, job_path))
    if job.gpus is not None:
        cluster = blamed("gpus", scale_cluster, cluster, job.gpus)
    file_pins = parse_fixes(job.fix, f"{job_path or 'job'}: field 'fix'") if job.fix else {}
    flag_pins = parse_fixes(fixes or [])
    pins = file_pins | flag_pins
    if teacher is None and any(k.startswith(("teacher.", "kd.")) for k in pins):
        bad = next(k for k in pins if k.startswith(("teacher.", "kd.")))
        src = "--fix" if bad in flag_pins else f"{job_path or 'job'}: field 'fix'"
        raise InputError(f"{src} {bad}: there is no teacher (--teacher none plans plain training)")
    from .search.mixed import check_gpu_pins
    check_gpu_pins(cluster, {k: v for k, v in file_pins.items() if k not in flag_pins}, f"{job_path or 'job'}: field 'fix'")
    check_gpu_pins(cluster, pins, "--fix")
    kd_vocab = None
    if teacher is not None:
        where = f"{job_path}: " if job_path and not {"teacher", "student"} <= given else ""
        try:
            kd_vocab = kd_vocab_size(teacher, student, job.run.tokenizer)
        except InputError as e:
            raise InputError(f"{where}{e}") from None
    for role, spec in (("teacher", teacher), ("student", student)):
        if spec is not None and job.seq_len > spec.max_positions:
            raise InputError(f"{origin('seq_len')}: {job.seq_len} exceeds the {role}'s max positions "
                             f"({spec.max_positions}, {spec.name})")
    tprec = ("bf16",)
    if teacher is None and job.teacher_precision in ("fp8", "int8"):
        raise InputError(f"{origin('teacher_precision')} {job.teacher_precision}: there is no teacher "
                         "(--teacher none plans plain training)")
    if teacher is not None:
        from .teacher_precision import allowed_teacher_precisions
        explicit = "teacher_precision" in given or "teacher_precision" in file_fields
        tprec = allowed_teacher_precisions(job.teacher_precision, cluster, pins.get("teacher.precision"),
                                           explicit=explicit, origin=origin("teacher_precision"))
    return Problem(job=job, teacher=teacher, student=student, cluster=cluster, fixes=pins,
                   job_path=job_path, teacher_precisions=tprec, kd_vocab_size=kd_vocab)


RUN_INPUT_PATHS = ("data", "tokenizer", "teacher_checkpoint", "student_checkpoint")


def _resolve_run_paths(job: JobSpec, job_path: str | None) -> JobSpec:
    """The executor's input paths ([run] data, tokenizer, checkpoints) that exist next to the job file
    become absolute, so the plan runs from any directory; output_dir stays relative to the cwd."""
    if not job_path:
        return job
    upd = {}
    for k in RUN_INPUT_PATHS:
        v = getattr(job.run, k)
        if v and not Path(v).is_absolute() and (Path(job_path).parent / v).exists():
            upd[k] = str((Path(job_path).parent / v).resolve())
    return job.model_copy(update={"run": job.run.model_copy(update=upd)}) if upd else job


def _rel(name: str, job_path: str | None) -> str:
    """Paths in a job file are relative to the job file; preset names stay as they are."""
    if job_path and ("/" in name or name.endswith((".json", ".yaml", ".yml"))):
        p = Path(name)
        if not p.is_absolute():
            cand = Path(job_path).parent / p
            if cand.exists():
                return str(cand)
    return name
