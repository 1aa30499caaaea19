"""What `kdplan run` (the executor in executor/) executes: the one table of plan features it does
not run, read by both sides.

- The executor (executor/launch.py ``check``) refuses the first ``unsupported(plan)`` finds, in one
  line, before any process group exists.
- The planner records them all in ``Plan.executor`` (``executor_check``), prints them in `kdplan
  plan`'s summary, and under ``kdplan plan --runnable`` leaves out the layouts ``layout_unsupported``
  names and refuses a job whose inputs need a feature of the list.

Torch-free and planner-free: it reads a Plan (or a Layout and a ModelSpec) and nothing else, so
kdplan.schema stays the executor's only import from the planner. A rule added here is enforced by
the executor and shown by the planner at once; tests/test_capability.py runs the executor's check
on a plan with each feature and checks that they agree.

Launch-time checks stay in executor/launch.py (world size, CUDA present, files present, the
plan's own consistency: tp divides the heads, stages tile the layers, ranks in range): they depend
on where and how a plan is launched, not on what the executor can run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .compression import sampled_loss_error

if TYPE_CHECKING:
    from .model import ModelSpec
    from .plan import ExecutorCheck, Layout, Plan

OWN_FORWARD_FAMILIES = ("qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "mixtral", "deepseek_v3")
"""Model families the executor builds with their own transformers classes and runs by their own HF
forward (executor/families.py): data-parallel only (tensor / pipeline parallelism use the Llama
module names)."""

FEATURES: dict[str, str] = {
    "sequence_kd": "sequence-level KD (kd.signal = sequence: teacher generation, retokenized for the student)",
    "hidden_state_kd": "hidden-state distillation (kd.hidden_state_dim)",
    "fp16": "fp16 compute (no loss scaling)",
    "context_parallel": "context parallelism (layout.cp > 1: ring attention over the sequence)",
    "hsdp": "hybrid sharding (layout.shard_group < dp)",
    "student_offload": "student optimizer offload (student.layout.offload)",
    "student_fp8": "fp8 student training (student.layout.train_precision = fp8: Transformer Engine style fp8 GEMMs)",
    "int8_grads_zero": "8-bit gradients with ZeRO >= 1 (student grad_compression with zero > 0)",
    "teacher_zero": "teacher ZeRO stages 1-2 (the forward-only teacher holds or shards its weights: 0 or 3)",
    "teacher_ep_zero3": "teacher expert parallelism under FSDP (teacher ep > 1 with zero = 3)",
    "teacher_uneven_groups": "teacher ep > 1 or zero = 3 with dp groups serving different numbers of student shards",
    "teacher_zero3_quantized": "a quantized (fp8/int8) teacher under FSDP (zero = 3, dp > 1)",
    "teacher_zero3_offload": "teacher weight offload under FSDP (zero = 3, dp > 1)",
    "teacher_optimizer_offload": "teacher optimizer offload (it has no optimizer)",
    "teacher_offload_tp": "teacher weight offload with tensor parallelism (tp > 1)",
    "teacher_training_knobs": "teacher recompute, virtual stages, gradient compression or another schedule",
    "sampled_loss": "a sampled teacher format with a loss other than forward KL",
    "family_layout": "tp/pp > 1 for the families run by their own HF forward (Qwen3, Gemma, Phi-3, MoE families)",
    "quantized_moe": "a quantized (fp8/int8) mixture-of-experts teacher",
    "deepseek_router_bias": "DeepSeek-V3 blocks without a routing bias",
    "job_students": "a whole-job plan of several students run one plan per student: side by side on GPU groups of"
                    " their own, fanned out from a teacher on its own GPUs, or one after another other than"
                    " offline (separate_online, online_then_cache)",
    "online_then_cache": "a whole job whose first epoch writes the teacher-output cache as it trains"
                         " (prediction.job.strategy = online_then_cache) with the teacher other than online and"
                         " co-located",
    "extra_students_layout": "several students in one run other than co-located, online, pp = 1, one shared mesh",
    "students_one_after_another": "students one after another in one run other than offline, on the same ranks,"
                                  " with one vocabulary (the cache's)",
}
"""Every feature the executor does not run, by the name ``Unsupported.feature`` carries."""


@dataclass(frozen=True)
class Unsupported:
    """A plan feature the executor does not run."""

    feature: str  # a key of FEATURES
    field: str  # the plan field that asks for it, e.g. "student.layout.offload"
    message: str  # one line: the field and value, why, and what to re-plan with

    def __str__(self) -> str:
        return self.message


def _refusal(feature: str, field: str, value, why: str, pin: str | None) -> Unsupported:
    return Unsupported(feature, field, f"{field} = {value}: {why}; re-plan" + (f" with {pin}" if pin else ""))


def family_unsupported(spec: ModelSpec, *, tp: int, pp: int, role: str,
                       forward_precision: str = "bf16") -> Unsupported | None:
    """The model-family rules: what the executor cannot run ``spec`` with in this layout."""
    field = f"{role}.layout"
    if spec.moe is not None and forward_precision != "bf16":
        return Unsupported("quantized_moe", f"{field}.forward_precision",
                           f"{role} {spec.name}: a {forward_precision} mixture-of-experts teacher is not run: the "
                           "executor quantizes 2-D Linear weights (executor/quant.py) and the experts are 3-D "
                           "tensors; plan it at bf16")
    if spec.family not in OWN_FORWARD_FAMILIES:
        return None
    if tp > 1 or pp > 1:
        return Unsupported("family_layout", f"{field}.tp" if tp > 1 else f"{field}.pp",
                           f"{role} {spec.name} ({spec.family}): tensor/pipeline parallelism (tp={tp}, pp={pp}) is "
                           "implemented for the Llama/Mistral/Qwen2 module names only; run it data-parallel "
                           f"(--fix {role}.tp=1 --fix {role}.pp=1; zero=3 shards its weights over dp)")
    if spec.moe is not None and spec.family == "deepseek_v3" and not spec.moe.router_bias:
        return Unsupported("deepseek_router_bias", f"{role}.model.moe.router_bias",
                           f"{role} {spec.name}: DeepSeek-V3 blocks always carry a routing bias (router_bias)")
    return None


def layout_unsupported(role: str, lay: Layout, model: ModelSpec) -> Unsupported | None:
    """The first rule one role's layout breaks on its own (no other role needed): what `kdplan plan
    --runnable` filters layouts with. ``role``: "teacher", "student" or "extra_students[i]" (no
    --fix keys: re-plan)."""
    pinned = role in ("student", "teacher")
    if lay.cp > 1:
        # Ring attention needs each rank's blocks to run on its sequence shard with K/V blocks
        # passed around the ring inside every attention (and a zigzag-aware loss and positions);
        # this executor runs whole sequences per rank.
        return _refusal("context_parallel", f"{role}.layout.cp", lay.cp,
                        f"ring attention (each sequence split over {lay.cp} ranks, K/V blocks passed around the"
                        " ring) is not run by this executor, which gives every rank whole sequences",
                        f"--fix {role}.cp=1" if pinned else None)
    if lay.shard < lay.dp:
        # FSDP2 runs HSDP as fully_shard(mesh=2-D (replicate, shard) DeviceMesh); this executor
        # builds one flat dp dimension per role, so it shards over the whole dp group only.
        return _refusal("hsdp", f"{role}.layout.shard_group", lay.shard_group,
                        f"hybrid sharding (ZeRO shards over {lay.shard} of the {lay.dp} dp ranks, replicated across"
                        " the groups) is not run by this executor",
                        f"--fix {role}.shard_group={lay.dp}" if role == "student"
                        else "a teacher sharded over its whole dp group" if role == "teacher" else None)
    if role != "teacher":
        if lay.train_precision != "job":
            # fp8 GEMMs forward and backward need fp8 casts with delayed scaling (Transformer Engine,
            # torchao float8) around every block Linear; this executor runs torch.nn.Linear at the
            # job's precision.
            return _refusal("student_fp8", f"{role}.layout.train_precision", lay.train_precision,
                            "this executor trains the student's GEMMs at the job's precision (no Transformer"
                            " Engine / float8 Linear layers)",
                            "--student-precision job")
        if lay.offload != "none":
            return _refusal("student_offload", f"{role}.layout.offload", lay.offload,
                            "this executor keeps the optimizer state on the device",
                            f"--fix {role}.offload=none" if pinned else None)
        if lay.grad_compression != "none" and lay.dp > 1 and lay.zero > 0:
            return _refusal("int8_grads_zero", f"{role}.layout.grad_compression", lay.grad_compression,
                            f"8-bit gradients travel through DDP's all-reduce hook, and ZeRO-{lay.zero} (FSDP)"
                            " reduce-scatters full-precision gradients",
                            f"--fix {role}.grad_compression=none or --fix {role}.zero=0" if pinned else None)
    else:
        if lay.zero not in (0, 3):
            return _refusal("teacher_zero", "teacher.layout.zero", lay.zero, "the forward-only teacher either holds"
                            " its weights (0) or shards them over its dp group (3)",
                            "--fix teacher.zero=0 or --fix teacher.zero=3")
        if lay.ep > 1 and lay.zero >= 3:
            return _refusal("teacher_ep_zero3", "teacher.layout.ep", lay.ep, "expert parallelism splits the experts"
                            " over the ep ranks and keeps the rest whole; FSDP (teacher.layout.zero = 3) over them is"
                            " not run", "--fix teacher.zero=0 or --fix teacher.ep=1")
        if lay.zero == 3 and lay.dp > 1:
            if lay.forward_precision != "bf16":
                return _refusal("teacher_zero3_quantized", "teacher.layout.forward_precision", lay.forward_precision,
                                "a quantized teacher's block weights are int8 / fp8 buffers, which FSDP"
                                " (teacher.layout.zero = 3) does not shard",
                                "--fix teacher.zero=0 or --fix teacher.precision=bf16")
            if lay.offload != "none":
                return _refusal("teacher_zero3_offload", "teacher.layout.zero", lay.zero, "sharded teacher weights"
                                " are not also streamed from host memory",
                                "--fix teacher.offload=none or --fix teacher.zero=0")
        if lay.offload == "optimizer":
            return _refusal("teacher_optimizer_offload", "teacher.layout.offload", lay.offload,
                            "the teacher runs forward only and has no optimizer state", "--fix teacher.offload=none")
        if lay.offload != "none" and lay.tp > 1:
            return _refusal("teacher_offload_tp", "teacher.layout.offload", lay.offload, "teacher weights are"
                            " streamed from host memory block by block only without tensor parallelism",
                            "--fix teacher.tp=1 or --fix teacher.offload=none")
        for field, value, default in (("recompute", lay.recompute, "none"), ("virtual_stages", lay.virtual_stages, 1),
                                      ("grad_compression", lay.grad_compression, "none"),
                                      ("schedule", lay.schedule, "1f1b")):
            if value != default:
                return Unsupported("teacher_training_knobs", f"teacher.layout.{field}",
                                   f"teacher.layout.{field} = {value}: the teacher runs forward only, one stage per"
                                   f" pipeline rank; a plan sets it to {default}")
    return family_unsupported(model, tp=lay.tp, pp=lay.pp, role="teacher" if role == "teacher" else "student",
                              forward_precision=lay.forward_precision)


def role_ranks(plan: Plan) -> tuple[list[int], list[int]]:
    """(teacher ranks, student ranks). Empty lists in the plan mean the planner's defaults
    (kdplan/search/decode.py): co-located and offline share ranks 0..n-1; disaggregated puts the
    teacher first and the student after it."""
    s = plan.student.layout
    if plan.teacher is None:
        return [], list(s.ranks) or list(range(s.num_gpus))
    t = plan.teacher.layout
    split = plan.kd.placement == "disaggregated" and plan.kd.mode == "online"
    teacher = list(t.ranks) or list(range(t.num_gpus))
    student = list(s.ranks) or list(range(t.num_gpus if split else 0, (t.num_gpus if split else 0) + s.num_gpus))
    return teacher, student


@dataclass(frozen=True)
class TargetRoute:
    """Which teacher dp group serves each student dp shard, and who sends and receives its targets
    (global ranks). Read by the executor (executor.teacher.Targets, executor.mesh.p2p_pairs) and by
    this table (``uneven_teacher_groups``): one rule, here."""

    group_of_shard: dict[int, int]  # student shard -> teacher dp index serving it
    sender: dict[int, int]  # student shard -> global rank that delivers its targets
    receivers: dict[int, list[int]]  # student shard -> global ranks that need them

    def shards_of_group(self, g: int) -> list[int]:
        return sorted(d for d, x in self.group_of_shard.items() if x == g)


def target_route(plan: Plan) -> TargetRoute:
    """The static route of the teacher's targets (every placement and mode).

    The global batch of a step is split into the student's dp shards; shard ``d`` is served by one
    teacher dp group (its tp x pp ranks), and its targets go to the ranks of the student's last
    pipeline stage with dp index ``d`` (all their tp ranks). The serving group is the one holding a
    receiver when one is a teacher rank (co-located: nothing crosses a link), else group
    d * teacher dp // student dp. One rank of that group's last stage sends: a receiver when one is
    there (it keeps its copy locally), else the group's tp 0. Ranks come from ``role_ranks``,
    listed in (pp, dp, tp) order with tp innermost (kdplan.schema.Layout.ranks)."""
    s, t = plan.student.layout, plan.teacher.layout
    tr, sr = role_ranks(plan)
    where = {r: i for i, r in enumerate(tr)}
    group, sender, receivers = {}, {}, {}
    for d in range(s.dp):
        recv = [sr[((s.pp - 1) * s.dp + d) * s.tp + k] for k in range(s.tp)]
        mine = [r for r in recv if r in where]
        g = (where[mine[0]] // t.tp) % t.dp if mine else d * t.dp // s.dp
        last = [tr[((t.pp - 1) * t.dp + g) * t.tp + k] for k in range(t.tp)]
        local = [r for r in last if r in recv]
        group[d], sender[d], receivers[d] = g, (local[0] if local else last[0]), recv
    return TargetRoute(group, sender, receivers)


def teacher_group_of_shard(plan: Plan) -> dict[int, int]:
    """Student dp shard -> the teacher dp group that serves it (``target_route``)."""
    return target_route(plan).group_of_shard


def uneven_teacher_groups(plan: Plan) -> list[int] | None:
    """The numbers of student shards the teacher's dp groups serve when they differ (then the groups
    run different numbers of forwards, which a collective across dp ranks cannot), else None."""
    group = teacher_group_of_shard(plan)
    counts = sorted({sum(1 for g in group.values() if g == x) for x in range(plan.teacher.layout.dp)})
    return counts if len(counts) > 1 else None


def job_strategy_unsupported(strategy: str) -> Unsupported | None:
    """A whole-job strategy (prediction.job.strategy) the executor does not run whatever the plan's
    layouts: what the job search leaves out under `kdplan plan --runnable`. None today: every
    strategy whose plan carries its students runs (online_then_cache: executor.teacher.Targets
    writes the cache during the online epoch); what a plan's own fields make unrunnable is
    ``_students_unsupported`` and ``_online_then_cache_unsupported``."""
    return None


def writes_cache_online(plan: Plan) -> bool:
    """The plan's job runs online_then_cache (prediction.job.strategy): the executor runs the teacher
    online, co-located, over each sample's first appearance and writes its outputs to the
    teacher-output cache as the student trains; every later visit of a sample reads the cache."""
    return plan.prediction.job is not None and plan.prediction.job.strategy == "online_then_cache"


def _online_then_cache_unsupported(plan: Plan) -> Unsupported | None:
    """online_then_cache's plan is its first epoch's step plan: the teacher online and co-located
    (kdplan.search.job._online_then_cache). Another kd block would leave the strategy unhonoured."""
    if not writes_cache_online(plan):
        return None
    kd = plan.kd
    for field, value, want in (("kd.mode", kd.mode, "online"), ("kd.placement", kd.placement, "colocated")):
        if value != want:
            return _refusal("online_then_cache", field, value, f"prediction.job.strategy = online_then_cache runs"
                            f" the teacher {want} in the first epoch and writes the cache as the student trains",
                            f"--fix {field}={want}, or re-plan with kd.mode=offline (a teacher pass, then the cache)")
    return None


ONE_RUN_ARRANGEMENT = "in_turn_each_step"
"""prediction.job.students_arrangement of the whole jobs `kdplan run` trains in one run (several
students in turn within each step on the same ranks: strategy online_fanout, or offline in turn)."""


SEQUENTIAL_ARRANGEMENT = "one_after_another"
"""prediction.job.students_arrangement of an offline job whose students `kdplan run` trains one after
another in one run (students_one_after_another): one teacher pass writes the cache, then each student
trains all its steps on all the run's ranks with its own step plan (layout, micro-batch, ZeRO), reading
the cache."""


def students_one_after_another(plan: Plan) -> bool:
    """Whether ``plan.extra_students`` are trained one after another (each its own step plan on all
    the run's ranks, after one teacher pass writing the cache: executor.train), not in turn within
    each step (CoStudent): an offline whole job whose prediction.job.students_arrangement is
    SEQUENTIAL_ARRANGEMENT. A plan without a whole-job prediction trains its extra_students in turn."""
    job = plan.prediction.job
    return bool(plan.extra_students) and job is not None and job.strategy == "offline" \
        and job.students_arrangement == SEQUENTIAL_ARRANGEMENT


def one_after_another_unsupported(plan: Plan) -> Unsupported | None:
    """Students one after another in one run (students_one_after_another): each student's own step
    plan, on the ranks ``student`` trains on (the run's processes), reading the one cache the
    teacher pass wrote (kd.mode offline; one vocabulary: the cache's targets are cut for
    student.model.vocab_size, which the cache key holds)."""
    if not students_one_after_another(plan):
        return None

    def refuse(field: str, value, why: str) -> Unsupported:
        return Unsupported("students_one_after_another", field, f"{field} = {value}: {why}; students one after"
                           " another in one run need it (re-plan)")

    if plan.kd.mode != "offline":
        return refuse("kd.mode", plan.kd.mode, "students one after another read the teacher-output cache one"
                      " teacher pass writes (kdplan plan --fix kd.mode=offline)")
    ranks = sorted(plan.student.layout.ranks or range(plan.student.layout.num_gpus))
    for i, r in enumerate(plan.extra_students):
        name = f"extra_students[{i}]"
        if sorted(r.layout.ranks or range(r.layout.num_gpus)) != ranks:
            return refuse(f"{name}.layout.ranks", r.layout.ranks, f"each student one after another trains on"
                          f" all the run's ranks, student.layout's {ranks}")
        if r.model.vocab_size != plan.student.model.vocab_size:
            return refuse(f"{name}.model.vocab_size", r.model.vocab_size, f"the cache holds the teacher's targets"
                          f" cut for student's table of {plan.student.model.vocab_size} rows")
    return None


def one_run_pins(first: Layout | None = None) -> dict[str, object]:
    """The pins (kdplan plan --fix keys) a student of a run that trains several students is planned
    with (executor.train.CoStudent; ``one_run_unsupported`` checks the plan): the first student
    (``first`` None) without pipeline stages, the teacher co-located on its ranks; students 2..n
    (``first``: the first student's layout) on its tp / pp / dp, one student mesh."""
    if first is None:
        return {"student.pp": 1, "kd.placement": "colocated"}
    return {"student.tp": first.tp, "student.pp": first.pp, "student.dp": first.dp}


def job_students_unsupported(strategy: str, arrangement: str, students: int, *, teacher_gpus: int | None = None,
                             first: str = "the first student") -> Unsupported | None:
    """A whole job of ``students`` students that `kdplan run` does not train in one run, whatever its
    layouts: the job search leaves it out under `kdplan plan --runnable` and the executor refuses a
    plan that predicts it. One run trains several students in turn within each step
    (ONE_RUN_ARRANGEMENT: online_fanout, or offline in turn) or offline one after another
    (SEQUENTIAL_ARRANGEMENT: one teacher pass, then each student its own step plan reading the
    cache); side by side (on GPU groups of their own), fanned out from a teacher on its own GPUs,
    and online one after another (separate_online) are one run per student."""
    if students < 2 or (arrangement == ONE_RUN_ARRANGEMENT and strategy in ("online_fanout", "offline")) \
            or (arrangement == SEQUENTIAL_ARRANGEMENT and strategy == "offline"):
        return None
    if strategy == "disaggregated_fanout":
        what = (f"streams the teacher's outputs from its own {teacher_gpus} GPUs to them side by side on"
                " their own GPUs, which this executor does not run (its students share the teacher's ranks)")
    else:
        how = ("reading a teacher cache on GPU groups of their own"
               if strategy == "offline" and arrangement == "side_by_side"
               else "one after another, the teacher recomputed for each")
        what = f"runs them {how}, each its own step plan, and this plan is the first student's"
    return Unsupported("job_students", "prediction.job.students",
                       f"prediction.job.students lists {students} students and prediction.job.strategy ="
                       f" {strategy} {what}: running it would train {first} only; plan each"
                       " student on its own (kdplan plan --student NAME) and run those plans, or re-plan so that"
                       " one run trains them all (strategy online_fanout, or offline in turn or one after"
                       " another)")


def _students_unsupported(plan: Plan) -> Unsupported | None:
    """A whole-job prediction for more students than the plan carries: the executor would train the
    first one only (job_students_unsupported says why for the arrangements one run does not train;
    an in-turn or one-after-another job must carry students 2..n in extra_students); then
    one_after_another_unsupported or one_run_unsupported, by the arrangement."""
    job = plan.prediction.job
    n = 1 + len(plan.extra_students)
    if job is not None and len(job.students) > n:
        u = job_students_unsupported(job.strategy, job.students_arrangement, len(job.students),
                                     teacher_gpus=job.teacher_gpus, first=plan.student.source)
        return u or Unsupported("job_students", "prediction.job.students",
                                f"prediction.job.students lists {len(job.students)} students and"
                                f" prediction.job.strategy = {job.strategy} trains them in one run, but the plan"
                                f" carries {n - 1} extra_students: running it would train {plan.student.source}"
                                " and those only; re-plan")
    if students_one_after_another(plan):
        return one_after_another_unsupported(plan)
    return one_run_unsupported(plan)


def one_run_unsupported(plan: Plan) -> Unsupported | None:
    """Several students in one run in turn within each step (plan.extra_students,
    executor.train.CoStudent; not students_one_after_another, which has its own rule): the teacher
    runs co-located, online once per batch or offline (one pass writing the cache, then each
    batch's cached targets read once), and every student trains on the same ranks from its outputs,
    without pipeline stages (one_run_pins). The job search checks the plans it prices an in-turn
    arrangement from with this same rule (kdplan.search.job), so it never offers one the executor refuses."""
    if not plan.extra_students or students_one_after_another(plan):
        return None
    s = plan.student.layout
    pins = one_run_pins()

    def refuse(field: str, value, why: str) -> Unsupported:
        return Unsupported("extra_students_layout", field,
                           f"{field} = {value}: {why}; several students in one run need it (re-plan)")

    if plan.kd.placement != pins["kd.placement"]:
        return refuse("kd.placement", plan.kd.placement, "with extra_students the teacher runs co-located on the"
                      " students' ranks, online once per batch or offline from the cache it writes, for every student"
                      " (kdplan plan --fix kd.placement=colocated)")
    if s.pp != pins["student.pp"]:
        return refuse("student.layout.pp", s.pp, "students of one run train without pipeline stages, pp = 1")
    ranks = s.ranks or list(range(s.num_gpus))
    for i, r in enumerate(plan.extra_students):
        e, name = r.layout, f"extra_students[{i}]"
        if e.pp != pins["student.pp"]:
            return refuse(f"{name}.layout.pp", e.pp, "students of one run train without pipeline stages, pp = 1")
        for f in ("tp", "dp"):
            if getattr(e, f) != getattr(s, f):
                return refuse(f"{name}.layout.{f}", getattr(e, f), f"every student of one run shares"
                              f" student.layout.{f} = {getattr(s, f)} (one student mesh: the teacher's targets reach"
                              " the same ranks)")
        if (e.ranks or list(range(e.num_gpus))) != ranks:
            return refuse(f"{name}.layout.ranks", e.ranks, f"the students of one run are co-located on"
                          f" student.layout.ranks = {ranks}")
        if r.model.vocab_size != plan.student.model.vocab_size:
            return refuse(f"{name}.model.vocab_size", r.model.vocab_size, f"the teacher's targets are cut for"
                          f" student's table of {plan.student.model.vocab_size} rows, which every student of one run"
                          " shares")
    return None


def unsupported(plan: Plan) -> list[Unsupported]:
    """Every feature of ``plan`` the executor does not run, in the order the executor checks them
    (it refuses the first). Empty: `kdplan run` executes it (launch-time checks aside)."""
    out: list[Unsupported] = []
    add = out.append
    if plan.job.precision == "fp16":  # executor.train.compute_dtype
        add(Unsupported("fp16", "job.precision", "precision fp16 is not run by the executor (no loss scaling);"
                        " plan with bf16 or fp32"))
    if plan.kd.signal != "logits":
        add(_refusal("sequence_kd", "kd.signal", plan.kd.signal, "sequence-level KD has the teacher generate text"
                     " that is then retokenized for the student, which needs both models' tokenizers here and a"
                     " generation loop this executor does not have (it distils logits over one tokenizer's ids)",
                     "a teacher that shares the student's tokenizer and --fix kd.signal=logits"))
    roles = [("student", plan.student)] + [(f"extra_students[{i}]", r) for i, r in enumerate(plan.extra_students)]
    roles += [("teacher", plan.teacher)] if plan.teacher is not None else []
    for name, role in roles:
        if u := layout_unsupported(name, role.layout, role.model):
            add(u)
    t = plan.teacher.layout if plan.teacher is not None else None
    if t is not None and (t.ep > 1 or (t.zero == 3 and t.dp > 1)) and (counts := uneven_teacher_groups(plan)):
        add(_refusal("teacher_uneven_groups", "teacher.layout.ep" if t.ep > 1 else "teacher.layout.zero",
                     t.ep if t.ep > 1 else t.zero, f"its dp groups would serve {counts} student shards each, and"
                     + (" the experts' all-to-alls need" if t.ep > 1 else " sharded weights need")
                     + " every rank of a group to run as many forwards",
                     "--fix teacher.ep=1" if t.ep > 1 else "--fix teacher.zero=0"))
    if plan.teacher is not None and (why := sampled_loss_error(plan.kd.compression, plan.kd.loss)):
        add(Unsupported("sampled_loss", "kd.loss", why))
    if plan.kd.hidden_state_dim is not None:
        add(_refusal("hidden_state_kd", "kd.hidden_state_dim", plan.kd.hidden_state_dim,
                     "hidden-state distillation is not implemented", "the job's kd.hidden_state_dim unset"))
    if plan.prediction.job is not None and (u := job_strategy_unsupported(plan.prediction.job.strategy)):
        add(u)
    elif u := _students_unsupported(plan) or _online_then_cache_unsupported(plan):
        add(u)
    return out


def executor_check(plan: Plan) -> ExecutorCheck:
    """``plan.executor``: whether the executor runs the plan, and each feature it would refuse."""
    from .plan import ExecutorCheck

    found = unsupported(plan)
    return ExecutorCheck(runnable=not found, unsupported=[u.message for u in found])
