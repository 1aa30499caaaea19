"""Teacher forward precision: which formats a device supports and which ones a job allows.

A forward-only teacher can run its GEMMs on low-precision tensor cores (FP8 on H100/H200, INT8
on A100/H100/H200) with its block weights quantized per output channel. That halves its weight
bytes and, by the profile's peaks and derating (``PeakCompute.fp8_tflops`` / ``int8_tops`` /
``low_precision_derating``), speeds up its GEMMs; it also changes its outputs slightly — a
fidelity trade the user opts into (``--teacher-precision fp8|int8|auto``, ``--fix
teacher.precision=...``). The default, ``bf16``, is the exact teacher. The baselines (mirror,
naive, single GPU) always keep the exact bf16 teacher: that is what people run today.
"""

from __future__ import annotations

from .errors import InputError
from .schema.cluster import ClusterProfile, GPUSpec

LOW_PRECISIONS = ("fp8", "int8")  # order = tie order: fp8 keeps more dynamic range for activations
WEIGHT_BYTES = {"fp8": 1, "int8": 1}  # per quantized weight
SCALE_BYTES = 4  # one fp32 scale per output channel


def supported(gpu: GPUSpec) -> tuple[str, ...]:
    """The low-precision teacher formats ``gpu`` has tensor cores for (from its profile)."""
    pk = gpu.peak
    return tuple(f for f, v in (("fp8", pk.fp8_tflops), ("int8", pk.int8_tops)) if v is not None)


def low_precision_peak_flops(gpu: GPUSpec, fmt: str) -> float:
    """Dense peak (op/s) of ``fmt`` on ``gpu``; ValueError where it has none."""
    v = {"fp8": gpu.peak.fp8_tflops, "int8": gpu.peak.int8_tops}[fmt]
    if v is None:
        raise ValueError(f"{gpu.name} has no {fmt} tensor cores")
    return v * 1e12


def student_fp8_error(cluster: ClusterProfile, precision: str) -> str | None:
    """Why the students cannot train in fp8 (Layout.train_precision) on ``cluster`` at the job's
    ``precision``; None when they can: every GPU type of the cluster has fp8 tensor cores in its
    profile, and the job is bf16 (Transformer Engine's fp8 recipe is bf16 mixed precision around
    the fp8 GEMMs)."""
    gpus = [cluster.gpu_of_group(i) for i in range(len(cluster.groups))]
    missing = sorted({g.name for g in gpus if g.peak.fp8_tflops is None})
    if missing:
        return (f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no fp8 tensor cores in the profile "
                "(fp8 training needs H100/H200/H800-class GPUs); plan with --student-precision job")
    if precision != "bf16":
        return f"fp8 training keeps bf16 master copies and activations: it needs --precision bf16, not {precision}"
    return None


def allowed_teacher_precisions(setting: str, cluster: ClusterProfile, pin: str | None, *, explicit: bool,
                               origin: str) -> tuple[str, ...]:
    """The teacher precisions the solver may choose, "bf16" first.

    ``setting`` is the job's teacher_precision (bf16 | fp8 | int8 | auto); ``pin`` a
    ``teacher.precision`` pin. A pin decides alone unless ``setting`` was given explicitly and
    does not allow it (then: InputError). A format no GPU of the cluster supports is an
    InputError when asked for by name, and simply not offered by ``auto``."""
    gpus = {g.node.gpu: cluster.gpu_of_group(i) for i, g in enumerate(cluster.groups)}
    hw = tuple(f for f in LOW_PRECISIONS if any(f in supported(g) for g in gpus.values()))
    names = ", ".join(sorted(gpus))

    def need(fmt: str, where: str) -> None:
        if fmt != "bf16" and fmt not in hw:
            ok = " and ".join(("bf16",) + hw)
            raise InputError(f"{where} {fmt}: {names} {'has' if len(gpus) == 1 else 'have'} no {fmt} tensor "
                             f"cores in its profile (supported teacher precisions: {ok})")

    if pin is not None:
        need(pin, "--fix teacher.precision")
        if explicit and setting not in ("auto", pin):
            raise InputError(f"--fix teacher.precision={pin} contradicts {origin} {setting}")
        return (pin,)
    if setting == "auto":
        return ("bf16",) + hw
    need(setting, origin)
    return (setting,)
