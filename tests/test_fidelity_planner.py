"""--min-fidelity: the planner picks among the formats whose measured share of dense KD's gain
(a fidelity curve with provenance) clears the bar, says which and why; unmeasured formats are not
eligible; sampled targets are refused with reverse KL / JSD (plan load, planner pin, executor)."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdplan.errors import Infeasible, InputError
from kdplan.jobs import load_job, resolve
from kdplan.planner import make_plan
from kdplan.schema.compression import parse_compression
from kdplan.schema.plan import KDPlan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-cpu" / "job.toml"


def curve(tmp_path, shares: dict[str, float]) -> str:
    doc = {"provenance": {"kind": "measured", "date": "2026-12-04", "command": "test", "device": "cpu",
                          "teacher": "t", "student": "s", "vocab_size": 8192, "seeds": 3, "steps": 40},
           "formats": {f: {"bytes_per_token": parse_compression(f).bytes_per_token(8192), "fidelity": x}
                       for f, x in shares.items()}}
    p = tmp_path / "curve.json"
    p.write_text(json.dumps(doc))
    return str(p)


def plan_for(min_fidelity, path, **kd):
    job = load_job(str(TINY))
    job = job.model_copy(update={"kd": job.kd.model_copy(update={"min_fidelity": min_fidelity,
                                                                   "fidelity_curve": path, **kd})})
    return make_plan(resolve(job, job_path=str(TINY)))


SHARES = {"dense": 1.0, "topk:64": 0.6, "sample:64": 0.93, "topk:8+sample:48": 0.88, "sample:16": 0.91}


def test_min_fidelity_picks_an_eligible_measured_format_and_says_why(tmp_path):
    path = curve(tmp_path, SHARES)
    plan = plan_for(0.9, path)
    c = str(plan.kd.compression)
    assert c in ("dense", "sample:64", "sample:16")  # measured >= 0.9; topk:64 (0.6) and the hybrid (0.88) are not
    why = plan.kd.compression_reason
    assert f"--min-fidelity 0.9: {c}" in why and f"{SHARES[c]:.0%} of dense KD's gain" in why
    assert "not eligible" in why and "topk:64 60%" in why  # the formats below the bar are named
    # without --min-fidelity, topk:16 (unmeasured) or others may win; with it, never an unmeasured one
    assert plan_for(0.9, path).kd.compression == plan.kd.compression  # deterministic


def test_min_fidelity_above_every_measurement_leaves_dense(tmp_path):
    plan = plan_for(0.99, curve(tmp_path, SHARES))
    assert str(plan.kd.compression) == "dense"
    assert "--min-fidelity 0.99: dense" in plan.kd.compression_reason


def test_unmeasured_formats_are_not_eligible(tmp_path):
    with pytest.raises(Infeasible, match="without a measurement are not eligible"):
        plan_for(0.5, curve(tmp_path, SHARES), allowed_compressions=["topk:16", "topk:32:8"])


def test_the_shipped_curve_has_provenance_and_covers_its_formats():
    from kdplan.profiles import load_fidelity_curve
    c = load_fidelity_curve()
    assert c.provenance.kind == "measured" and c.provenance.seeds >= 2 and c.provenance.command
    assert c.fidelity(parse_compression("dense")) == 1.0
    for f, m in c.formats.items():
        assert m.bytes_per_token == pytest.approx(parse_compression(f).bytes_per_token(c.provenance.vocab_size))


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_sampled_target_with_a_biased_loss_is_refused(loss, tmp_path):
    with pytest.raises(ValidationError, match="only forward_kl is unbiased"):
        KDPlan(compression="sample:8", loss=loss)
    with pytest.raises(InputError, match="only forward_kl is unbiased"):  # a pin, at planning
        job = load_job(str(TINY))
        job = job.model_copy(update={"kd": job.kd.model_copy(update={"loss": loss})})
        make_plan(resolve(job, job_path=str(TINY), pins=["kd.compression=topk:4+sample:8"]))
    job = load_job(str(TINY))  # unpinned: the search leaves sampled formats out
    plan = make_plan(resolve(job.model_copy(update={"kd": job.kd.model_copy(update={"loss": loss})}), job_path=str(TINY)))
    assert not plan.kd.compression.sampled


def test_cli_refuses_a_sampled_plan_with_reverse_kl(kdplan_cli, tmp_path):
    r = kdplan_cli("plan", TINY, "--fix", "kd.compression=sample:8", "-o", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["kd"]["loss"] = "reverse_kl"
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    r = kdplan_cli("run", tmp_path / "bad.json", "--steps", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "only forward_kl is unbiased" in r.stderr


def test_executor_check_refuses_a_sampled_target_with_reverse_kl(tmp_path):
    pytest.importorskip("torch")
    from exec_helpers import layout, make_plan as make_exec_plan

    from executor.launch import check
    from executor.runs import Refused
    plan = make_exec_plan(tmp_path, layout(), compression="sample:8")
    bad = plan.model_copy(update={"kd": plan.kd.model_copy(update={"loss": "jsd"})})  # model_copy skips validators
    with pytest.raises(Refused, match="only forward_kl is unbiased"):
        check(bad, world_size=1, device="cpu")


def test_sampled_formats_are_priced_by_their_bytes_and_passes():
    from kdplan.cost.compute import DEFAULT_TOPK_PASSES, KD_PASSES, SAMPLE_PASSES, loss_passes
    assert loss_passes(train=False, kd="sample", k=0) == SAMPLE_PASSES  # sample:N: no top-k
    assert loss_passes(train=False, kd="sample", k=8) == SAMPLE_PASSES + DEFAULT_TOPK_PASSES  # + the head's top-k
    # the student gathers at N ids: no tail logsumexp over V as top-k's bucket needs
    assert loss_passes(train=True, kd="sample") < loss_passes(train=True, kd="topk") < loss_passes(train=True, kd="dense")
    assert KD_PASSES["sample"] > 0
    # payload bytes: N ids of ceil(log2 V) bits (+ topk:M:8's head), ~150x under dense at V = 8,192
    assert parse_compression("sample:64").bytes_per_token(8192) == 64 * 13 / 8
    assert parse_compression("topk:8+sample:48").bytes_per_token(8192) == \
        parse_compression("topk:8:8").bytes_per_token(8192) + 48 * 13 / 8


@pytest.mark.parametrize("args,msg", [
    (["--min-fidelity", "1.5"], "--min-fidelity"),
    (["--min-fidelity", "0"], "--min-fidelity"),
])
def test_bad_min_fidelity_is_one_line_exit_2(kdplan_cli, tmp_path, args, msg):
    r = kdplan_cli("plan", TINY, *args, "-o", tmp_path / "p.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr


def test_missing_fidelity_curve_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="fidelity curve .* not found"):
        plan_for(0.9, str(tmp_path / "nope.json"))
