"""The plan is the contract, executor side (issue 14): what a plan field asks for is what runs.

Single-process tests in a gloo world of one (as tests/test_exec_quant.py): the teacher's own
micro-batch, and the run / KD settings each change the losses of a short run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from exec_helpers import TEACHER, layout, make_plan, make_teacher_checkpoint  # noqa: E402


@pytest.fixture
def world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Counting:
    """A TeacherRunner stand-in around the real one: records the batch size of every forward."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []
        self.device = runner.device

    def logits(self, ids):
        self.batches.append(ids.shape[0])
        return self.runner.logits(ids)


def test_the_teacher_runs_its_own_micro_batch(world_of_one, tmp_path):
    """Student micro-batch 2 (4 micro-batches of a global batch of 8): a teacher micro-batch of 1,
    2, 3, 4 or 8 runs the teacher on that many sequences per forward (3: 3, 3, 2), and the student
    receives the same targets whatever it is."""
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.teacher import Targets
    from executor.train import Data, RunInputs, build_teacher

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    rows = torch.randint(0, TEACHER.vocab_size, (16, 33), generator=torch.Generator().manual_seed(5))
    targets = {}
    for tmb in (1, 2, 3, 4, 8):
        plan = make_plan(tmp_path, layout(mb=2), layout(mb=tmb), teacher_ckpt=ck, global_batch=8)
        tmesh, smesh = build_meshes(plan, 0, "cpu")
        inputs = RunInputs(rows=rows, teacher_checkpoint=str(ck), student_checkpoint=None, out_dir=tmp_path)
        runner = _Counting(build_teacher(plan, tmesh, inputs, torch.device("cpu"), ByteCounter()))
        data = Data(rows, plan)
        t = Targets(plan, tmesh=tmesh, smesh=smesh, runner=runner, microbatch=data.microbatch,
                    n_micro=data.n_micro, vocab_size=TEACHER.vocab_size, counter=ByteCounter())
        t.teacher_phase(0)
        assert runner.batches == [min(tmb, 8 - i) for i in range(0, 8, tmb)], (tmb, runner.batches)
        assert not t._chunks  # every chunk served and released
        targets[tmb] = torch.cat([t.get(0, m).logits for m in range(data.n_micro)])
    for tmb in (1, 3, 4, 8):
        torch.testing.assert_close(targets[tmb], targets[2], rtol=1e-4, atol=1e-4)


# ---- every run / KD setting changes what runs ------------------------------------------------------

def _losses(plan, out_dir):
    """Losses (step, total, kd, ce) of a 2-step run of ``plan`` in this process."""
    from executor.launch import prepare
    from executor.train import train

    plan = plan.model_copy(update={"run": plan.run.model_copy(update={"output_dir": str(out_dir)})})
    inputs = prepare(plan, out_dir)
    inputs.checkpoint_dir = out_dir / "checkpoints" / "test"
    stats, _, _ = train(plan, inputs, steps=2, resume=False, progress=False)
    return [x[1:] for x in stats[0].losses]


def _with(plan, **upd):
    """The plan with run.* / kd.* / job.* keys replaced (``run__lr=...``)."""
    parts = {}
    for k, v in upd.items():
        sect, key = k.split("__")
        parts.setdefault(sect, {})[key] = v
    return plan.model_copy(update={s: getattr(plan, s).model_copy(update=d) for s, d in parts.items()})


def test_run_and_kd_settings_change_what_runs(world_of_one, tmp_path):
    """Each setting, changed alone, changes the losses where it should act (and only there for
    the optimizer settings: step 0 is computed before the first update)."""
    from executor.launch import Refused
    from executor.models import build_model, materialize, save_checkpoint
    from exec_helpers import STUDENT, TEXT

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    base = make_plan(tmp_path, layout(mb=2), teacher_ckpt=ck, global_batch=4)
    n = iter(range(100))
    run = lambda p: _losses(p, tmp_path / f"run{next(n)}")  # noqa: E731
    ref = run(base)
    assert len(ref) == 2

    def differs(p, step, term):  # term: 0 total, 1 kd, 2 ce
        return run(p)[step][term] != ref[step][term]

    lr = run(_with(base, run__lr=2 * base.run.lr))
    assert lr[0] == ref[0] and lr[1][0] != ref[1][0]
    wd = run(_with(base, run__weight_decay=0.5))
    assert wd[0] == ref[0] and wd[1][0] != ref[1][0]
    assert differs(_with(base, run__seed=base.run.seed + 1), 0, 0)
    alpha = run(_with(base, kd__alpha=0.9))
    assert alpha[0][1:] == ref[0][1:] and alpha[0][0] != ref[0][0]  # same kd and ce, other weighting
    assert differs(_with(base, kd__temperature=1.0), 0, 1)
    assert differs(_with(base, kd__loss="reverse_kl"), 0, 1)
    jsd = _with(base, kd__loss="jsd", kd__beta=0.2)
    assert run(jsd)[0][1] != run(_with(jsd, kd__beta=0.8))[0][1]
    assert differs(_with(base, job__global_batch=8), 0, 0)
    assert differs(_with(base, job__seq_len=16), 0, 0)
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT[::-1])
    assert differs(_with(base, run__data=str(other_text)), 0, 2)
    student = save_checkpoint(materialize(build_model(STUDENT), seed=99), tmp_path / "student")
    assert differs(_with(base, run__student_checkpoint=str(student)), 0, 2)
    teacher2 = save_checkpoint(materialize(build_model(TEACHER), seed=12), tmp_path / "teacher2")
    assert differs(_with(base, run__teacher_checkpoint=str(teacher2)), 0, 1)
    pre = _with(base, run__teacher_checkpoint=None, run__teacher_pretrain_steps=1)
    assert run(pre)[0][1] != run(_with(pre, run__teacher_pretrain_steps=3))[0][1]
    from pathlib import Path
    big = Path(__file__).resolve().parent.parent / "examples" / "tiny-cpu" / "tokenizer"  # 8,192 tokens > 320
    with pytest.raises(Refused, match="tokenizer has"):
        run(_with(base, run__tokenizer=str(big)))


# ---- no plan field is silently ignored --------------------------------------------------------------
#
# Every field of the plan schema (walked recursively) has an entry: T(test) names an executor test
# in which changing the field changes what runs (losses, bytes, memory, the layout run, or a
# refusal); R(...) is a value check() (or loading the plan) must refuse, naming the field; I(why)
# marks what the executor does not act on by design (the planner's bookkeeping and prediction).
# A new field without an entry fails test_every_plan_field_is_honoured_or_refused.

def T(test):  # "file.py::test_name"
    return ("test", test)


def R(*edits):  # (path, value) pairs applied to a valid 2-process plan
    return ("refused", edits)


def I(why):  # noqa: E743
    return ("info", why)


LAYOUTS = "test_exec_layouts.py::test_layout_matches_single_process"
SETTINGS = "test_exec_contract.py::test_run_and_kd_settings_change_what_runs"
BASELINE = "test_exec_launch.py::test_a_baseline_run_runs_the_layout_the_plan_priced_and_reports_its_prediction"
PREDICTED = I("the cost model's prediction: copied into the report's predicted block, next to what was measured")


def _layout_entries(role: str) -> dict:
    p = f"{role}.layout."
    common = {p + "tp": T(LAYOUTS), p + "pp": T(LAYOUTS), p + "dp": T(LAYOUTS), p + "num_gpus": T(LAYOUTS),
              p + "shard_group": R((p + "zero", 3), (p + "shard_group", 1)),
              p + "sequence_parallel": T(LAYOUTS), p + "ranks": T(LAYOUTS),
              p + "stages[].first_layer": T(LAYOUTS), p + "stages[].last_layer": T(LAYOUTS),
              p + "stages[].ranks": R((p + "stages", [{"first_layer": 0, "last_layer": 2 if role == "teacher" else 4,
                                                       "ranks": [1]}])),
              p + "stages[].gpu": I("the GPU type the cost model priced these ranks on; torchrun decides the devices"),
              # context parallelism: priced by the planner, refused by the executor (capability table)
              p + "cp": R((p + "cp", 2), (p + "dp", 1)),
              # fp8 training: priced for the student, refused by the executor (capability table);
              # a teacher's is refused by the plan itself (it does not train)
              p + "train_precision": R((p + "train_precision", "fp8")),
              }
    if role == "student":
        return common | {p + "ep": R((p + "ep", 2)), p + "offload": R((p + "offload", "optimizer")), p + "zero": T(LAYOUTS), p + "micro_batch": T(LAYOUTS),
                         p + "recompute": T("test_exec_recompute.py::test_selective_recomputes_the_attention_core_and_nothing_else"),
                         p + "virtual_stages": T(LAYOUTS), p + "schedule": T(LAYOUTS),
                         p + "grad_compression": T("test_exec_layouts.py::test_int8_gradients_train_close_and_send_a_quarter"),
                         p + "forward_precision": R((p + "forward_precision", "int8"))}
    return common | {p + "ep": T("test_exec_expert_parallel.py::test_expert_parallel_teacher_runs_in_the_executor_and_matches_one_process"),
                     p + "zero": T("test_exec_contract.py::test_teacher_zero3_shards_its_weights_over_its_dp_group"),
                     p + "offload": T("test_exec_contract.py::test_teacher_weight_offload_streams_block_by_block"),
                     p + "micro_batch": T("test_exec_contract.py::test_the_teacher_runs_its_own_micro_batch"),
                     p + "recompute": R((p + "recompute", "full")), p + "virtual_stages": R((p + "virtual_stages", 2)),
                     p + "schedule": R((p + "schedule", "gpipe")), p + "grad_compression": R((p + "grad_compression", "int8")),
                     p + "forward_precision": T("test_exec_quant.py::test_executor_builds_the_plans_teacher_precision")}


FIELDS = {
    "schema_version": T("test_exec_launch.py::test_schema_version_and_garbage_are_refused"),
    "kdplan_version": I("provenance"), "created_utc": I("provenance"),
    "job.cluster": I("what the plan was made for; the executor runs on the processes torchrun starts"),
    "job.gpus": I("the job's GPU bound; the executor needs world_size processes"),
    "job.gpus_per_node": T("test_exec_launch.py::test_run_prints_the_torchrun_command_and_a_slurm_script_for_multi_node"),
    "job.gpu_types": I("the GPU types the cost model priced; torchrun decides the devices"),
    "job.device_kind": T("test_exec_contract.py::test_a_gpu_plan_is_refused_without_cuda"),
    "job.seq_len": T(SETTINGS), "job.global_batch": T(SETTINGS),
    "job.precision": R(("job.precision", "fp16")),
    "job.tokens": I("the token budget the cost model turns into hours and dollars"),
    "job.dataset_tokens": T("test_exec_epochs.py::test_three_offline_epochs_match_three_online_epochs_and_a_restart_reads_the_cache"),
    "teacher.source": I("provenance: the preset or config the model came from (the model itself is inlined)"),
    "student.source": I("provenance: the preset or config the model came from (the model itself is inlined)"),
    "teacher.model": T("test_exec_launch.py::test_models_that_do_not_match_are_refused"),
    "student.model": T("test_exec_launch.py::test_models_that_do_not_match_are_refused"),
    **_layout_entries("teacher"), **_layout_entries("student"),
    "kd.signal": R(("kd.signal", "sequence")),
    "kd.signal_reason": I("why the planner chose sequence-level KD (a kd.signal the executor refuses)"),
    "kd.mode": T(LAYOUTS), "kd.placement": T(LAYOUTS),
    "kd.loss": T(SETTINGS), "kd.temperature": T(SETTINGS), "kd.alpha": T(SETTINGS), "kd.beta": T(SETTINGS),
    "kd.compression": T("test_exec_layouts.py::test_resume_reproduces_the_uninterrupted_run"),
    "kd.compression_reason": I("why the planner chose the format"),
    "kd.teacher_precision_reason": I("why the planner chose the teacher precision"),
    "kd.hidden_state_dim": R(("kd.hidden_state_dim", 16)),
    "kd.max_in_flight": T(LAYOUTS),
    "kd.vocab_size": T("test_exec_families.py::test_padded_teacher_table_distils_over_the_shared_ids"),
    "prediction.step_time_s": T("test_reliability.py::test_hung_rank_ends_the_run_naming_it"),
    **{f"prediction.{k}": PREDICTED for k in (
        "tokens_per_s", "mfu", "memory_per_gpu_gib", "comm_bytes_per_step", "utilization", "breakdown_s",
        "bytes_per_step", "memory", "memory_per_role_gib", "idle_s", "speedup_vs_single_gpu", "speedup_vs_mirror",
        "comm_reduction_vs_naive_dp", "cost_per_million_tokens_usd")},
    "prediction.job": T("test_exec_multi_student.py::test_a_job_for_more_students_than_the_plan_carries_is_refused"),
    "extra_students": T("test_exec_multi_student.py::test_each_student_trains_as_it_would_alone"),
    "prediction.generation": I("sequence-level KD's predicted generation pass; the executor refuses such a plan "
                               "by its kd.signal"),
    "prediction.offline": T("test_reliability.py::test_offline_kd_kill_resumes_the_cache_exactly"),
    **{f"prediction.baselines.{b}.{k}": PREDICTED for b in ("single_gpu", "naive_dp", "mirror") for k in (
        "step_time_s", "comm_bytes_per_step", "utilization", "memory_per_gpu_gib", "description")},
    **{f"prediction.baselines.{b}.{k}": T(BASELINE) for b in ("single_gpu", "naive_dp", "mirror")
       for k in ("student", "teacher", "reason")},
    **{f"solver.{k}": I("how the plan was chosen") for k in (
        "name", "status", "solve_time_s", "num_candidates", "objective", "gap")},
    "alternatives": I("runner-up plans, for kdplan inspect"),
    "run.data": T(SETTINGS), "run.tokenizer": T(SETTINGS), "run.teacher_checkpoint": T(SETTINGS),
    "run.student_checkpoint": T(SETTINGS), "run.teacher_pretrain_steps": T(SETTINGS), "run.lr": T(SETTINGS),
    "run.weight_decay": T(SETTINGS), "run.seed": T(SETTINGS),
    "run.steps": T("test_reliability.py::test_a_rerun_never_resumes_another_runs_checkpoints"),
    "run.checkpoint_every": T("test_reliability.py::test_kills_and_a_hang_restart_and_lose_nothing"),
    "run.output_dir": T("test_reliability.py::test_a_rerun_never_resumes_another_runs_checkpoints"),
    "world_size": T("test_exec_launch.py::test_world_size_mismatch_is_refused_before_init"),
    "executor": I("the planner's note of what `kdplan run` executes (kdplan.schema.capability); the executor"
                  " checks the plan itself, from the same table (tests/test_capability.py)"),
}


def _walk(cls, prefix=""):
    """Every field path of ``cls`` that has an entry, recursing into nested models without one."""
    import typing

    from pydantic import BaseModel

    def models(a):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return [a]
        return [m for x in typing.get_args(a) for m in models(x)]

    def is_list(a):
        return typing.get_origin(a) is list or any(is_list(x) for x in typing.get_args(a))

    for name, f in cls.model_fields.items():
        path = prefix + name
        nested = models(f.annotation)
        if path in FIELDS or not nested:
            yield path
        else:
            yield from _walk(nested[0], path + ("[]." if is_list(f.annotation) else "."))


def _set(data: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        data = data[k]
    data[last] = value


def test_every_plan_field_is_honoured_or_refused(tmp_path):
    from pathlib import Path

    from pydantic import ValidationError

    from executor.launch import Refused, check
    from kdplan.schema import Plan

    paths = list(_walk(Plan))
    missing = [p for p in paths if p not in FIELDS]
    assert not missing, f"plan fields with no executor test, refusal or reason (add them to FIELDS): {missing}"
    assert not set(FIELDS) - set(paths), f"entries for fields the plan no longer has: {set(FIELDS) - set(paths)}"
    here = Path(__file__).parent
    base = make_plan(tmp_path, layout(dp=2)).model_dump(mode="json")
    check(Plan.model_validate(base), world_size=2, device="cpu")  # the base plan is accepted
    for path, (kind, arg) in FIELDS.items():
        if kind == "test":
            file, name = arg.split("::")
            assert f"def {name}(" in (here / file).read_text(), f"{path}: {arg} does not exist"
        elif kind == "refused":
            data = Plan.model_validate(base).model_dump(mode="json")
            for p, v in arg:
                _set(data, p, v)
            with pytest.raises((Refused, ValidationError)) as e:
                check(Plan.model_validate(data), world_size=2, device="cpu")
            assert path.split(".")[-1].removeprefix("stages[]") in str(e.value) or \
                path.split("[].")[-1] in str(e.value), (path, str(e.value))
        else:
            assert kind == "info" and len(arg) > 8, path


def test_a_gpu_plan_is_refused_without_cuda(tmp_path):
    import subprocess
    import sys

    from exec_helpers import ROOT, write_plan

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: a GPU plan is accepted")
    plan = make_plan(tmp_path, layout())
    plan = plan.model_copy(update={"job": plan.job.model_copy(update={"device_kind": "gpu", "precision": "bf16"})})
    r = subprocess.run([sys.executable, "-m", "executor.launch", str(write_plan(tmp_path / "gpu.json", plan)),
                        "--check-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr, r.stderr


def test_teacher_weight_offload_streams_block_by_block(world_of_one, tmp_path):
    """teacher.offload = weights: the same logits; between forwards no block weight is resident;
    each forward streams every block's weights once (counted as offload bytes)."""
    from executor.kd.grad_hooks import ByteCounter
    from executor.mesh import build_meshes
    from executor.parallelize import blocks
    from executor.train import RunInputs, build_teacher

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    ids = torch.randint(0, TEACHER.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    out, counters, runners = {}, {}, {}
    for off in ("none", "weights"):
        plan = make_plan(tmp_path, layout(mb=2), layout(mb=2).model_copy(update={"offload": off}), teacher_ckpt=ck)
        tmesh, _ = build_meshes(plan, 0, "cpu")
        inputs = RunInputs(rows=torch.zeros(1, 33, dtype=torch.long), teacher_checkpoint=str(ck),
                           student_checkpoint=None, out_dir=tmp_path)
        counters[off] = ByteCounter()
        runners[off] = build_teacher(plan, tmesh, inputs, torch.device("cpu"), counters[off])
        out[off] = [runners[off].logits(ids) for _ in range(2)]
    torch.testing.assert_close(out["weights"][1], out["none"][0])
    torch.testing.assert_close(out["weights"][0], out["none"][0])
    block_bytes = sum(p.numel() * 4 for b in blocks(runners["none"].stage) for p in b.parameters())
    streamed = counters["weights"].as_dict().get("offload", 0)
    # two forwards stream every block once each; the first block of a third is already prefetched
    assert streamed == 2 * block_bytes + block_bytes // TEACHER.num_layers, (streamed, block_bytes)
    assert counters["none"].as_dict().get("offload", 0) == 0
    assert all(p.numel() == 0 for b in blocks(runners["weights"].stage) for p in b.parameters())


def test_teacher_zero3_shards_its_weights_over_its_dp_group(tmp_path):
    """teacher.zero = 3 on 2 processes (teacher dp 2, co-located with a dp-2 student): the same
    losses as the replicated teacher (FSDP gathers the same weights), and the weights' all-gathers
    appear in the report (teacher_params bytes), which the replicated teacher never sends."""
    from exec_helpers import launch, losses, read_report, write_plan

    ck = make_teacher_checkpoint(tmp_path / "teacher")
    reports = {}
    for zero in (0, 3):
        plan = make_plan(tmp_path, layout(dp=2), layout(dp=2, zero=zero), teacher_ckpt=ck)
        path = write_plan(tmp_path / f"z{zero}.json", plan)
        r = launch(path, 2, "--steps", 2, "--output-dir", tmp_path / f"out{zero}", "--report", tmp_path / f"z{zero}.report.json")
        assert r.returncode == 0, r.stderr[-4000:]
        reports[zero] = read_report(tmp_path / f"z{zero}.report.json")
    assert losses(reports[3]) == pytest.approx(losses(reports[0]), rel=1e-5)
    teacher_params = sum(p.numel() * 4 for p in _teacher_params())
    assert reports[3]["measured"]["bytes_per_step"]["teacher_params"] > 0
    assert "teacher_params" not in reports[0]["measured"]["bytes_per_step"]
    # per rank and forward, the other rank's half of the weights: 4 forwards per step (2 micro-batches x 2 ranks)
    assert reports[3]["measured"]["bytes_per_step"]["teacher_params"] == pytest.approx(4 * teacher_params / 2, rel=0.01)


def _teacher_params():
    from executor.models import build_model
    return list(build_model(TEACHER).parameters())
