"""Resolve a job: job TOML + command-line flags -> models, cluster and validated pins.

``resolve`` returns the ``Problem`` (kdplan.problem) that the cost model, the solver and the
simulator take; the pins are parsed and checked by kdplan.pins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import DifferentTokenizers, InputError
from .io import explain_validation, load_model, relative_to_file
from .models import is_none, kd_vocab_size, load_model_spec
from .pins import LOGIT_KD_PIN_KEYS, check_context_pins, check_expert_pins, check_gpu_pins, check_pins_need_teacher, parse_pins
from .problem import Problem
from .profiles import load_cluster, scale_cluster
from .schema.job import JobSpec, KDSettings
from .teacher_precision import allowed_teacher_precisions, student_fp8_error

def load_job(path: str | None) -> JobSpec:
    if path is None:
        return JobSpec()
    return load_model(JobSpec, path)


# Command-line flag of each override key, so an error names what the user typed.
FLAGS = {"teacher": "--teacher", "student": "--student", "cluster": "--cluster", "gpus": "--gpus",
         "seq_len": "--seq-len", "global_batch": "--global-batch", "precision": "--precision",
         "tokens": "--tokens", "kd.min_topk": "--min-topk", "kd.min_fidelity": "--min-fidelity",
         "solver.objective": "--objective", "solver.runnable": "--runnable",
         "teacher_precision": "--teacher-precision", "student_precision": "--student-precision", "students": "--student", "dataset_tokens": "--dataset-tokens"}


def resolve(job: JobSpec, *, overrides: dict[str, Any] | None = None, pins: list[str] | None = None,
            job_path: str | None = None) -> Problem:
    """Apply command-line overrides to a job spec and resolve models, cluster and pins.

    Every error names where the bad value came from: the flag, or the job file and its field."""
    given = {k for k, v in (overrides or {}).items() if v is not None}
    file_fields = set(job.model_fields_set)
    # [kd] settings the job gives a value other than the default (a job resolved once has every
    # field set, so being set alone does not say the user chose it)
    file_kd_fields = {k for k in job.kd.model_fields_set
                      if getattr(job.kd, k) != KDSettings.model_fields[k].default} if "kd" in file_fields else set()

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

    def blamed(key: str, fn, *args):
        try:
            return fn(*args)
        except InputError as e:
            if key in given and str(e).startswith(origin(key)):
                raise  # already names its flag ("--gpus 12 is not ...")
            raise InputError(f"{origin(key)}: {e}") from None

    if job.students:
        if job.student != job.students[0] and ("student" in given or "student" in file_fields):
            raise InputError(f"{origin('student')} {job.student!r} is not the first of students "
                             f"{job.students}: give the students once, as a list")
        job = job.model_copy(update={"student": job.students[0]})
    job = _resolve_run_paths(job, job_path)
    teacher = None if is_none(job.teacher) else blamed("teacher", load_model_spec, relative_to_file(job.teacher, job_path))
    student = blamed("student", load_model_spec, relative_to_file(job.student, job_path))
    cluster = blamed("cluster", load_cluster, relative_to_file(job.cluster, job_path))
    if job.gpus is not None:
        cluster = blamed("gpus", scale_cluster, cluster, job.gpus)
    file_source = f"{job_path or 'job'}: field 'fix'"
    file_pins = parse_pins(job.fix, file_source) if job.fix else {}
    flag_pins = parse_pins(pins or [])
    pinned = file_pins | flag_pins
    if teacher is None:
        check_pins_need_teacher(pinned, lambda k: "--fix" if k in flag_pins else file_source)
    check_gpu_pins(cluster, {k: v for k, v in file_pins.items() if k not in flag_pins}, file_source)
    check_gpu_pins(cluster, pinned, "--fix")
    check_expert_pins(pinned, teacher, lambda k: "--fix" if k in flag_pins else file_source)
    check_context_pins(pinned, job.seq_len, lambda k: "--fix" if k in flag_pins else file_source)
    students = tuple([student] + [blamed("students", load_model_spec, relative_to_file(s, job_path))
                                  for s in (job.students or [])[1:]]) if job.students else ()
    for other in students[1:]:
        if other.vocab_size != student.vocab_size:
            raise InputError(f"{origin('students')}: student vocabularies differ ({student.name}: "
                             f"{student.vocab_size}, {other.name}: {other.vocab_size}); one teacher's "
                             "outputs feed every student, so they need one shared vocabulary")
        if job.seq_len > other.max_positions:
            raise InputError(f"{origin('seq_len')}: {job.seq_len} exceeds the student's max positions "
                             f"({other.max_positions}, {other.name})")
    if "kd.loss" in pinned:  # the pin is the job's kd.loss
        job = job.model_copy(update={"kd": job.kd.model_copy(update={"loss": pinned["kd.loss"]})})
    kd_vocab, signal, signal_reason = None, "logits", None
    if teacher is not None:
        where = f"{job_path}: " if job_path and not {"teacher", "student"} <= given else ""
        pin_origin = lambda k: "--fix" if k in flag_pins else file_source  # noqa: E731
        try:
            kd_vocab = kd_vocab_size(teacher, student, job.run.tokenizer,
                                     teacher_source=relative_to_file(job.teacher, job_path),
                                     student_source=relative_to_file(job.student, job_path))
        except DifferentTokenizers as e:
            logit = _logit_kd_asked(pinned, pin_origin, file_kd_fields, given, origin)
            if logit:
                raise InputError(f"{logit} asks for KD on logits, but {where}{e}; without that setting kdplan "
                                 "plans sequence-level KD (the teacher generates text, the student trains on it "
                                 "with cross-entropy in its own tokenizer)") from None
            signal = "sequence"
            signal_reason = str(e)
        except InputError as e:
            raise InputError(f"{where}{e}") from None
        if pinned.get("kd.signal") == "sequence":
            if logit := _logit_kd_asked(pinned, pin_origin, set(), given, origin):
                raise InputError(f"{logit} asks for KD on logits, but kd.signal=sequence is pinned (sequence-level "
                                 "KD trains the student with cross-entropy on the teacher's text)")
            signal = "sequence"
            unused = [f"kd.{k}" for k in LOGIT_KD_SETTINGS if k in file_kd_fields]
            signal_reason = signal_reason or (f"{pin_origin('kd.signal')} kd.signal=sequence"
                                              + (f" (the job's {', '.join(unused)} do not apply)" if unused else ""))
        if signal == "sequence":
            _check_generation_pins(pinned, pin_origin, cluster)
            if job.teacher_precision in ("fp8", "int8"):
                raise InputError(f"{origin('teacher_precision')} {job.teacher_precision}: sequence-level KD "
                                 "prices the teacher's generation at bf16 only")
    for role, spec in (("teacher", teacher), ("student", student)):
        if spec is not None and job.seq_len > spec.max_positions:
            raise InputError(f"{origin('seq_len')}: {job.seq_len} exceeds the {role}'s max positions "
                             f"({spec.max_positions}, {spec.name})")
    if job.student_precision == "fp8":
        if why := student_fp8_error(cluster, job.precision):
            raise InputError(f"{origin('student_precision')} fp8: {why}")
    tprec = ("bf16",)
    if teacher is None and job.teacher_precision in ("fp8", "int8"):
        raise InputError(f"{origin('teacher_precision')} {job.teacher_precision}: there is no teacher "
                         "(--teacher none plans plain training)")
    if teacher is not None:
        explicit = "teacher_precision" in given or "teacher_precision" in file_fields
        tprec = allowed_teacher_precisions(job.teacher_precision, cluster, pinned.get("teacher.precision"),
                                           explicit=explicit, origin=origin("teacher_precision"))
        if teacher.moe is not None and tprec != ("bf16",):
            # The executor's weight quantization covers 2-D Linear weights; experts are 3-D tensors.
            if "bf16" not in tprec:
                raise InputError(f"{origin('teacher_precision')} {tprec[0]}: {teacher.name} is a mixture-of-experts "
                                 "model, whose experts the executor does not quantize; its teacher runs at bf16")
            tprec = ("bf16",)
    return Problem(job=job, teacher=teacher, student=student, cluster=cluster, pins=pinned,
                   job_path=job_path, teacher_precisions=tprec, students=students, kd_vocab_size=kd_vocab,
                   kd_signal=signal, kd_signal_reason=signal_reason)


# Job settings that only mean something for KD on logits ([kd] fields, and their flags).
LOGIT_KD_SETTINGS = ("loss", "temperature", "alpha", "beta", "min_topk", "allowed_compressions",
                     "min_fidelity", "fidelity_curve", "hidden_state_dim")


def _logit_kd_asked(pinned, pin_origin, file_kd_fields, given, origin) -> str | None:
    """Where the user asked for KD on logits (a pin, a [kd] field or its flag), or None."""
    if pinned.get("kd.signal") == "logits":
        return f"{pin_origin('kd.signal')} kd.signal=logits"
    for k in LOGIT_KD_PIN_KEYS:
        if k in pinned:
            return f"{pin_origin(k)} {k}={pinned[k]}"
    for k in LOGIT_KD_SETTINGS:
        if f"kd.{k}" in given:
            return origin(f"kd.{k}")
        if k in file_kd_fields:
            return origin(f"kd.{k}")
    return None


def _check_generation_pins(pinned, pin_origin, cluster) -> None:
    """Sequence-level KD's teacher generates with its bf16 weights resident on one GPU type
    (kdplan.cost.generation): the teacher pins that ask otherwise are refused, by name."""
    refused = (("teacher.zero", "3", "gathering ZeRO-3 shards for every decoded token is not planned"),
               ("teacher.offload", "weights", "streaming weights from host memory for every decoded token is not planned"),
               ("teacher.precision", "fp8", "the generation is priced at bf16 only"),
               ("teacher.precision", "int8", "the generation is priced at bf16 only"))
    for k, value, why in refused:
        if k in pinned and str(pinned[k]) == value:
            raise InputError(f"{pin_origin(k)} {k}={value}: sequence-level KD generates with the teacher's bf16 "
                             f"weights in HBM; {why}")
    if pinned.get("teacher.ep", 1) != 1:
        raise InputError(f"{pin_origin('teacher.ep')} teacher.ep={pinned['teacher.ep']}: sequence-level KD's "
                         "generation is priced with every expert on each replica; expert-parallel decoding is not "
                         "planned (pin teacher.ep=1)")
    if len(cluster.groups) > 1:
        raise InputError(f"cluster {cluster.name}: sequence-level KD on a mixed cluster is not planned yet; "
                         "plan it on one GPU type")


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
