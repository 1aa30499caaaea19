"""Pins: ``--fix KEY=VALUE`` (and a job file's ``fix``), every key, its parser and its checks.

A pin fixes part of the layout and leaves the rest to the solver. This module is the one home of
the concept: the keys (``PIN_KEYS``), the parser (``parse_pins``), what a pin allows
(``pin_allows`` for a layout's value, ``arrangement_allowed`` for a placement and the GPUs of each
role) and the checks that turn a pin nothing satisfies into one clear message:

- ``check_pins_need_teacher`` and ``check_gpu_pins``: bad input (exit 2), raised while resolving;
- ``check_layout_pins``: a pin that leaves a role without a valid layout (Infeasible, exit 3).

Pinned values are kept in their parsed, typed form (``int``, ``bool``, ``str``).
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import Infeasible, InputError
from .profiles import hardware_names
from .schema.compression import SPELLINGS, parse_compression


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


def _gpu_name(v: str) -> str:
    """A GPU type or group name (``a100-80g``, ``group1``); checked against the cluster by check_gpu_pins."""
    s = v.strip().lower()
    if not s or not all(c.isalnum() or c in "-_." for c in s):
        raise ValueError(f"expected a GPU type (e.g. a100-80g, h100-80g) or a group (group0, group1, ...), got {v!r}")
    return s


PIN_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "teacher.tp": (_pos_int, "teacher tensor-parallel degree"),
    "teacher.pp": (_pos_int, "teacher pipeline-parallel degree"),
    "teacher.dp": (_pos_int, "teacher data-parallel degree (replicas)"),
    "teacher.ep": (_pos_int, "teacher expert-parallel degree (MoE teacher: routed experts split over ep dp ranks)"),
    "teacher.cp": (_pos_int, "teacher context-parallel degree (ring attention: each sequence split over cp ranks)"),
    "teacher.micro_batch": (_pos_int, "teacher micro-batch (sequences)"),
    "teacher.offload": (_choice("none", "weights"), "teacher weights in host memory"),
    "teacher.zero": (_choice("0", "3"), "teacher weights sharded over its dp group (3) or not (0)"),
    "teacher.gpu": (_gpu_name, "GPU type (or groupN) the teacher runs on, on a mixed cluster"),
    "teacher.precision": (_choice("bf16", "fp8", "int8"), "teacher forward precision (fp8/int8: quantized weights)"),
    "student.tp": (_pos_int, "student tensor-parallel degree"),
    "student.pp": (_pos_int, "student pipeline-parallel degree"),
    "student.dp": (_pos_int, "student data-parallel degree"),
    "student.cp": (_pos_int, "student context-parallel degree (ring attention: each sequence split over cp ranks)"),
    "student.zero": (_zero, "student ZeRO stage 0-3"),
    "student.shard_group": (_pos_int, "data-parallel ranks one ZeRO shard spans (dp: the whole group; "
                            "fewer: hybrid sharding, HSDP)"),
    "student.micro_batch": (_pos_int, "student micro-batch (sequences)"),
    "student.recompute": (_choice("none", "selective", "full"), "activation recomputation"),
    "student.sequence_parallel": (_bool, "Megatron sequence parallelism"),
    "student.virtual_stages": (_pos_int, "model chunks per pipeline rank"),
    "student.offload": (_choice("none", "optimizer"), "optimizer state in host memory"),
    "student.grad_compression": (_choice("none", "int8"), "gradient all-reduce payload"),
    "student.gpu": (_gpu_name, "GPU type (or groupN) the student runs on, on a mixed cluster"),
    "kd.mode": (_choice("online", "offline"), "teacher during training or precomputed"),
    "kd.placement": (_choice("colocated", "disaggregated"), "teacher on student GPUs or its own"),
    "kd.compression": (parse_compression, SPELLINGS),
    "kd.loss": (_choice("forward_kl", "reverse_kl", "jsd"), "KD divergence on logits (the job's kd.loss)"),
    "kd.signal": (_choice("logits", "sequence"),
                  "logit KD, or sequence-level KD (the teacher generates text; the student trains on it)"),
}
"""key -> (parser of the typed value, description)."""

NUMERIC_PIN_KEYS = frozenset(k for k in PIN_KEYS
                             if k.rsplit(".", 1)[1] in ("tp", "pp", "dp", "cp", "zero", "shard_group", "micro_batch",
                                                   "virtual_stages"))
"""Pins whose values are numbers (a what-if sweep over one plots it as a numeric axis)."""

LOGIT_KD_PIN_KEYS = ("kd.mode", "kd.placement", "kd.compression", "kd.loss")
"""Pins that only mean something for KD on logits (refused with a sequence-level signal)."""

GPU_PIN_KEYS = ("teacher.gpu", "student.gpu")
"""Pins that choose the GPUs a role runs on (a type or ``groupN``), not its layout."""

NO_TEACHER_MSG = "there is no teacher (--teacher none plans plain training)"


def parse_pins(items: dict[str, str] | list[str], source: str = "--fix") -> dict[str, Any]:
    """Validate pins. ``items`` is a list of KEY=VALUE strings or a mapping; ``source`` (the flag,
    or the job file and field) starts every error message."""
    pairs: list[tuple[str, str]] = []
    if isinstance(items, dict):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        for it in items:
            if "=" not in it:
                raise InputError(f"{source} {it!r}: expected KEY=VALUE (keys: {', '.join(PIN_KEYS)})")
            k, v = it.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k == "student.ep":
            raise InputError(f"{source} {k}={v}: expert parallelism is planned for the forward-only teacher "
                             "only (teacher.ep); a trained mixture-of-experts student keeps every expert on each "
                             "rank, its weights sharded over the dp group by FSDP (pin student.zero=3 for that)")
        if k not in PIN_KEYS:
            raise InputError(f"{source} {k!r}: unknown key; known: {', '.join(PIN_KEYS)}")
        try:
            val = PIN_KEYS[k][0](v)
        except ValueError as e:
            raise InputError(f"{source} {k}={v}: {e}") from None
        if k in out and out[k] != val:
            raise InputError(f"{source} {k} is pinned twice with different values ({out[k]} and {val})")
        out[k] = val
    return out


def needs_teacher(key: str) -> bool:
    """Whether a pin only makes sense with a teacher (teacher.* and kd.*)."""
    return key.startswith(("teacher.", "kd."))


def check_pins_need_teacher(pins: dict[str, Any], source: str | Callable[[str], str]) -> None:
    """Exit-2 error for a teacher or kd pin when there is no teacher. ``source`` names where the
    pin came from (a string, or a function of the key)."""
    bad = next((k for k in pins if needs_teacher(k)), None)
    if bad is not None:
        src = source(bad) if callable(source) else source
        raise InputError(f"{src} {bad}: {NO_TEACHER_MSG}")


def check_expert_pins(pins: dict[str, Any], teacher, source: str | Callable[[str], str] = "--fix") -> None:
    """Exit-2 errors for a teacher.ep pin the teacher cannot take (a dense teacher, an ep that
    does not divide its routed experts, or one with teacher.zero=3: see EP_ZERO3_MSG)."""
    ep = pins.get("teacher.ep")
    if ep is None or teacher is None:
        return
    src = source("teacher.ep") if callable(source) else source
    if teacher.moe is None and ep != 1:
        raise InputError(f"{src} teacher.ep={ep}: {teacher.name} is a dense model (no experts to split); "
                         "expert parallelism needs a mixture-of-experts teacher")
    if teacher.moe is not None and teacher.moe.num_experts % ep:
        ok = [d for d in range(1, teacher.moe.num_experts + 1) if teacher.moe.num_experts % d == 0]
        raise InputError(f"{src} teacher.ep={ep} does not divide {teacher.name}'s {teacher.moe.num_experts} "
                         f"routed experts (divisors: {', '.join(map(str, ok))})")
    if ep > 1 and str(pins.get("teacher.zero")) == "3":
        raise InputError(f"{src} teacher.ep={ep} with teacher.zero=3: {EP_ZERO3_MSG}")


def check_context_pins(pins: dict[str, Any], seq_len: int, source: str | Callable[[str], str] = "--fix") -> None:
    """Exit-2 error for a teacher.cp / student.cp pin that cannot split the job's sequences
    (kdplan.schema.plan.context_parallel_error: 2*cp equal zigzag chunks)."""
    from .schema.plan import Layout, context_parallel_error
    for key in ("teacher.cp", "student.cp"):
        cp = pins.get(key)
        if cp is None or cp == 1:
            continue
        role = key.split(".")[0]
        if why := context_parallel_error(seq_len, Layout(cp=cp, num_gpus=cp), role):
            src = source(key) if callable(source) else source
            raise InputError(f"{src} {key}={cp}: {why.split(': ', 1)[1]}")
        if key == "teacher.cp" and pins.get("teacher.ep", 1) != 1:
            src = source(key) if callable(source) else source
            raise InputError(f"{src} teacher.cp={cp} with teacher.ep={pins['teacher.ep']}: expert parallelism "
                             "under context parallelism is not planned (pin one of them to 1)")


EP_ZERO3_MSG = ("expert parallelism already splits the experts over the ep ranks; sharding the rest over dp "
                "(FSDP of the experts over the expert-data-parallel group) is not planned: pin teacher.zero=0 "
                "or teacher.ep=1")


def layout_pins(pins: dict[str, Any], role: str) -> dict[str, Any]:
    """The pins of ``role``'s layout (``role.gpu`` chooses the role's GPUs, not its layout)."""
    return {k: v for k, v in pins.items() if k.startswith(role + ".") and k != role + ".gpu"}


def pin_allows(pins: dict[str, Any], role: str, name: str, value) -> bool:
    """True when ``value`` is allowed for ``role.name`` by the pins."""
    k = f"{role}.{name}"
    if k not in pins:
        return True
    pin = pins[k]
    if name == "zero" and role == "teacher":
        pin = int(pin)
    return pin == value


def check_layout_pins(pins: dict[str, Any], options_by_role: dict[str, int]) -> None:
    """Raise Infeasible naming a pin when the pins leave a role without any layout."""
    for role, count in options_by_role.items():
        if count == 0:
            mine = layout_pins(pins, role)
            if mine:
                desc = ", ".join(f"{k}={v}" for k, v in mine.items())
                raise Infeasible(f"no valid {role} layout satisfies --fix {desc} on the GPUs it has "
                                 f"(tp must divide the heads and stay in a node, pp the layers, "
                                 f"dp the global batch, micro_batch the per-replica batch)",
                                 binding=f"pin {desc}", suggestion="relax the pin")


# ---- placement and GPU pins: kd.mode, kd.placement, teacher.gpu, student.gpu ---------------
# A GPU pin names a GPU type (``a100-80g``) or a group (``group0``, ``group1``, ... in the
# cluster file's order) and restricts the role to the groups it names.


def pin_groups(cluster, value: str) -> tuple[int, ...] | None:
    """Indices of the groups a GPU pin value names (a GPU type or ``groupN``); None if none."""
    v = value.strip().lower()
    if v.startswith("group") and v[5:].isdigit():
        i = int(v[5:])
        return (i,) if i < len(cluster.groups) else None
    out = tuple(i for i, g in enumerate(cluster.groups) if g.node.gpu.lower() == v)
    return out or None


def role_groups(arr) -> dict[str, tuple[int, ...]]:
    """The groups each role of an arrangement (``search.candidates.Arrangement``) runs on."""
    student = tuple(arr.student_groups)
    if arr.mode == "train":
        return {"student": student}
    teacher = (arr.teacher_group,) if arr.placement == "disaggregated" else student
    return {"teacher": teacher, "student": student}


def gpu_pins_allow(arr, cluster, pins: dict[str, Any]) -> bool:
    """Whether an arrangement puts every GPU-pinned role only on the groups its pin names."""
    for role, groups in role_groups(arr).items():
        pin = pins.get(f"{role}.gpu")
        if pin is None:
            continue
        allowed = pin_groups(cluster, pin) or ()
        if not set(groups) <= set(allowed):
            return False
    return True


def arrangement_allowed(arr, cluster, pins: dict[str, Any]) -> bool:
    """Whether an arrangement satisfies the kd.mode, kd.placement and GPU pins (offline KD runs
    its teacher pass on the student's GPUs, so it is co-located)."""
    mode = arr.mode if arr.mode != "train" else "online"
    if pins.get("kd.mode", mode) != mode:
        return False
    if arr.mode == "online" and pins.get("kd.placement", arr.placement) != arr.placement:
        return False
    if arr.mode == "offline" and pins.get("kd.placement", "colocated") != "colocated":
        return False
    return gpu_pins_allow(arr, cluster, pins)


def check_gpu_pins(cluster, pins: dict[str, Any], source: str = "--fix") -> None:
    """Exit-2 errors for GPU pins the cluster cannot satisfy (one line each)."""
    types = list(dict.fromkeys(g.node.gpu for g in cluster.groups))
    names = ", ".join(types) + (f" (or group0..group{len(cluster.groups) - 1})" if len(cluster.groups) > 1 else "")
    for key in GPU_PIN_KEYS:
        v = pins.get(key)
        if v is None or pin_groups(cluster, v) is not None:
            continue
        if v in hardware_names():
            raise InputError(f"{source} {key}={v}: cluster {cluster.name} has no {v} GPUs; its GPU types: {names}")
        raise InputError(f"{source} {key}={v}: unknown GPU type; known types: {', '.join(hardware_names())}; "
                         f"cluster {cluster.name} has {names}")
    t, s = pins.get("teacher.gpu"), pins.get("student.gpu")
    if t is not None and s is not None and pins.get("kd.placement") == "colocated" \
            and set(pin_groups(cluster, t)) != set(pin_groups(cluster, s)):
        raise InputError(f"{source} teacher.gpu={t} and student.gpu={s} differ, but kd.placement=colocated "
                         "runs both roles on the same GPUs; pin the same GPU type or kd.placement=disaggregated")
