"""Sequence-level KD (issue 19): teacher and student with different tokenizers are planned as the
teacher generating text once and the student training on it with cross-entropy; logit KD across
them is refused naming the tokenizers; the generation is priced by kdplan.cost.generation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from kdplan.cost.compute import PRECISION_BYTES
from kdplan.cost.generation import (DECODE_HBM_FRACTION, MAX_DECODE_BATCH, kv_bytes_per_token_layer,
                                    price_generation, split_tokens, touched_experts)
from kdplan.errors import InputError
from kdplan.jobs import resolve
from kdplan.models import preset
from kdplan.planner import make_plan
from kdplan.problem import Problem
from kdplan.profiles import load_cluster
from kdplan.schema import JobSpec, KDSettings, Layout

DS = ("--teacher", "deepseek-v3", "--student", "qwen3-8b", "--cluster", "dgx-h200", "--gpus", "64")


@pytest.fixture(scope="module")
def ds_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "plan.json"
    r = subprocess.run([sys.executable, "-m", "kdplan.cli.main", "plan", *DS, "--tokens", "1e9", "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", **_env()})
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


def _env():
    import os
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_different_tokenizers_plan_sequence_level_kd_with_the_teacher_layout(ds_plan):
    r, plan = ds_plan
    kd, gen, lay = plan["kd"], plan["prediction"]["generation"], plan["teacher"]["layout"]
    assert kd["signal"] == "sequence" and kd["alpha"] == 0.0 and kd["vocab_size"] is None
    assert "129280" in kd["signal_reason"] and "151936" in kd["signal_reason"]
    # The generation layout spans the job's GPUs and holds 671B bf16 weights: more than tp=8 alone.
    assert lay["tp"] * lay["pp"] * lay["dp"] == 64 and lay["tp"] * lay["pp"] > 8
    assert gen["teacher_pass_s_per_step"] > 0 and gen["memory_per_gpu_gib"] <= 141
    assert gen["kv_cache_bytes_per_token"] == 61 * (512 + 64) * 2  # MLA's latent + rotary key, bf16
    # The summary says what is planned and why, and shows the teacher's expert layout.
    out = " ".join(r.stdout.split())
    assert "sequence-level" in out and "different tokenizers (deepseek_v3 vs qwen3)" in out
    assert "256 x 58 blocks, top-8 + 1 shared" in out and "teacher generation" in out
    # The student's step is plain cross-entropy: no teacher outputs travel, the same as training alone.
    alone = make_plan(resolve(JobSpec(teacher=None, student="qwen3-8b", cluster="dgx-h200", gpus=64)), top_k=0)
    assert plan["prediction"]["step_time_s"] == pytest.approx(alone.prediction.step_time_s, rel=1e-12)
    assert plan["prediction"]["bytes_per_step"].get("teacher_outputs", 0.0) == 0.0


def test_the_whole_job_is_one_generation_pass_then_the_student(ds_plan):
    _, plan = ds_plan
    job, gen = plan["prediction"]["job"], plan["prediction"]["generation"]
    tps = plan["job"]["global_batch"] * plan["job"]["seq_len"]
    steps = 1e9 / tps
    assert job["strategy"] == "sequence" and job["teacher_passes"] == 1.0
    assert job["cache_bytes"] == pytest.approx(4 * 1e9)  # one int32 id per token
    want = gen["teacher_pass_s_per_step"] * steps + plan["prediction"]["step_time_s"] * steps
    assert job["total_time_s"] == pytest.approx(want, rel=1e-6)  # the id write hides behind the generation
    assert job["baselines"]["separate_mirror"]["total_time_s"] is None
    assert "tokenizers" in job["baselines"]["separate_mirror"]["reason"]


@pytest.mark.parametrize("pin", ["kd.loss=forward_kl", "kd.compression=topk:64", "kd.signal=logits", "kd.mode=offline"])
def test_logit_kd_across_tokenizers_is_refused_naming_them(kdplan_cli, pin):
    r = kdplan_cli("plan", *DS, "--fix", pin)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert pin in line and "deepseek_v3 vs qwen3" in line and "129280" in line and "151936" in line


def test_a_logit_setting_in_the_job_file_is_refused_naming_the_field():
    job = JobSpec(teacher="deepseek-v3", student="qwen3-8b", cluster="dgx-h200", gpus=64,
                  kd=KDSettings(temperature=2.0))
    with pytest.raises(InputError, match=r"kd\.temperature.*different tokenizers"):
        resolve(job, job_path="job.toml")
    with pytest.raises(InputError, match="min_topk|--min-topk"):
        resolve(JobSpec(teacher="deepseek-v3", student="qwen3-8b", cluster="dgx-h200", gpus=64),
                overrides={"kd.min_topk": 8})


def test_generation_pins_that_cannot_be_honoured_are_refused():
    base = dict(teacher="deepseek-v3", student="qwen3-8b", cluster="dgx-h200", gpus=64)
    for pin in ("teacher.zero=3", "teacher.offload=weights"):
        with pytest.raises(InputError, match=pin.replace(".", r"\.")):
            resolve(JobSpec(**base), pins=[pin])
    p = resolve(JobSpec(**base), pins=["teacher.tp=4", "teacher.pp=4"])
    plan = make_plan(p, top_k=0)
    assert (plan.teacher.layout.tp, plan.teacher.layout.pp, plan.teacher.layout.dp) == (4, 4, 4)


def test_same_tokenizer_pairs_stay_logit_kd_unless_sequence_is_pinned():
    p = resolve(JobSpec(teacher="qwen3-30b-a3b", student="qwen3-1.7b", cluster="dgx-h100", gpus=16))
    assert p.kd_signal == "logits" and p.kd_signal_reason is None
    tiny = str(ROOT / "examples" / "tiny-cpu" / "job.toml")
    from kdplan.jobs import load_job
    pinned = resolve(load_job(tiny), pins=["kd.signal=sequence"], job_path=tiny)
    # the file's non-default [kd] temperature does not apply, and the plan says so
    assert pinned.kd_signal == "sequence" and "kd.temperature" in pinned.kd_signal_reason
    plan = make_plan(pinned, top_k=0)
    assert plan.kd.signal == "sequence" and plan.prediction.generation is not None
    with pytest.raises(InputError, match="kd.compression=dense asks for KD on logits"):
        resolve(load_job(tiny), pins=["kd.signal=sequence", "kd.compression=dense"], job_path=tiny)


def test_the_executor_refuses_a_sequence_level_plan_in_one_line(tmp_path):
    tiny = ROOT / "examples" / "tiny-cpu" / "job.toml"
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "kdplan.cli.main", "plan", str(tiny), "--fix", "kd.signal=sequence",
                        "-o", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "executor.launch", str(out), "--check-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "kd.signal = sequence" in r.stderr and "tokenizers" in r.stderr
    r = subprocess.run([sys.executable, "-m", "executor.launch", str(out), "--check-only", "--baseline", "mirror"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and "kd.signal = sequence" in r.stderr and "--teacher none" in r.stderr, r.stderr


# ---- the generation's price (kdplan.cost.generation) ------------------------------------------

def _problem(teacher: str, gpus: int, cluster: str = "dgx-h100", seq_len: int = 2048, prompt_ratio: float = 0.2):
    return Problem(job=JobSpec(seq_len=seq_len, global_batch=64, kd=KDSettings(prompt_ratio=prompt_ratio)),
                   teacher=preset(teacher), student=preset("qwen3-1.7b"), cluster=load_cluster(cluster, gpus))


def test_one_sequence_in_flight_reads_the_weights_once_per_token():
    """Batch 1, tp = pp = 1: a decoded token costs reading the weights (the input embedding is only
    looked up) at the achieved HBM bandwidth, plus a KV cache that is small at 2k tokens."""
    p = _problem("llama-3.1-8b", 8)
    m, gpu = p.teacher, p.cluster.gpu_of_group(0)
    g = price_generation(p, Layout(dp=8, num_gpus=8), decode_batch=1)
    assert g.fits and g.cost.decode_bound == "memory"
    weights = 2 * (m.num_params() - m.vocab_size * m.hidden_size)
    floor = weights / (gpu.memory_bandwidth_gb_per_s * 1e9 * DECODE_HBM_FRACTION)
    kv = g.cost.mean_context_tokens * kv_bytes_per_token_layer(m, 2) * m.num_layers
    assert kv_bytes_per_token_layer(m, 2) == 2 * 8 * 128 * 2
    assert g.cost.decode_s_per_token == pytest.approx(floor * (1 + kv / weights), rel=1e-9)
    # A larger decode batch shares the weight read: cheaper per token, up to the memory or the cap.
    best = price_generation(p, Layout(dp=8, num_gpus=8)).cost
    assert best.decode_s_per_token < g.cost.decode_s_per_token / 20
    # 16 GB of weights leave room for 236 caches of 2,048 tokens (128 KiB each per token) in 80 GB, not 237.
    assert best.decode_batch == 236 < MAX_DECODE_BATCH and best.memory_per_gpu_gib <= 80
    assert not price_generation(p, Layout(dp=8, num_gpus=8), decode_batch=237).fits


def test_generation_memory_holds_every_weight_once():
    """tp = pp = 1, one sequence: the weights (a tied table counted once), one 2k-token KV cache,
    then the profile's fragmentation and runtime allowances."""
    for name in ("gemma-2-9b", "llama-3.1-8b"):  # tied and untied embeddings
        p = _problem(name, 8)
        m, ov = p.teacher, p.cluster.overheads
        g = price_generation(p, Layout(dp=8, num_gpus=8), decode_batch=1).cost
        kv = 2048 * kv_bytes_per_token_layer(m, 2) * m.num_layers
        logits = m.vocab_size * 6
        want = (2 * m.num_params() + kv + logits) * (1 + ov.fragmentation_fraction) + ov.framework_memory_gib * 2**30
        assert g.memory_per_gpu_gib * 2**30 == pytest.approx(want, rel=1e-9), name


def test_moe_decode_reads_the_experts_its_tokens_touch():
    m = preset("deepseek-v3")
    assert touched_experts(m, 1) == pytest.approx(8)  # top-8 of 256: the active parameters
    assert touched_experts(m, 1000) == pytest.approx(256, rel=1e-3)  # every expert at a large batch
    assert touched_experts(preset("qwen3-8b"), 64) == 0.0
    p = _problem("deepseek-v3", 64, cluster="dgx-h200")
    lay = Layout(tp=8, pp=2, dp=4, num_gpus=64)
    one, many = (price_generation(p, lay, decode_batch=b).cost for b in (2, 256))
    assert one.decode_bound == "memory"
    # 2 sequences in flight read ~active weights, not all 671B: far less than a full read per round.
    bw = p.cluster.gpu_of_group(0).memory_bandwidth_gb_per_s * 1e9
    full_read = 2 * m.num_params() / 8 / (bw * DECODE_HBM_FRACTION)
    assert one.decode_round_s < 0.3 * full_read
    assert many.decode_s_per_token < one.decode_s_per_token / 10


def test_long_sequences_fit_fewer_in_flight_and_prompts_are_cheaper_than_answers():
    lay = Layout(tp=8, dp=1, num_gpus=8)
    short = price_generation(_problem("llama-3.1-70b", 8, seq_len=2048), lay).cost
    long = price_generation(_problem("llama-3.1-70b", 8, seq_len=65536), lay).cost
    assert long.decode_batch < short.decode_batch
    assert long.memory_per_gpu_gib <= 80
    # Prefill is compute bound on large GEMMs, decode memory bound: a prompt token costs less.
    assert short.prefill_s_per_token < short.decode_s_per_token
    more_prompt = price_generation(_problem("llama-3.1-70b", 8, prompt_ratio=1.0), lay).cost
    assert more_prompt.teacher_pass_s_per_step < short.teacher_pass_s_per_step
    assert split_tokens(2048, 1.0) == (1024.0, 1024.0)


def test_a_teacher_too_large_to_generate_is_infeasible_naming_its_memory(kdplan_cli):
    r = kdplan_cli("plan", "--teacher", "deepseek-v3", "--student", "qwen3-8b", "--cluster", "dgx-h200", "--gpus", "8")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "cannot generate" in r.stderr and "GiB" in r.stderr


def test_whatif_sweeps_the_signal_and_keeps_a_resolved_job_sequence_level(kdplan_cli, tmp_path):
    import csv
    tiny = ROOT / "examples" / "tiny-cpu" / "job.toml"
    r = kdplan_cli("whatif", tiny, "--sweep", "kd.signal=logits,sequence", "--csv", tmp_path / "a.csv")
    assert r.returncode == 0, r.stderr
    rows = {row["kd.signal"]: row for row in csv.DictReader(open(tmp_path / "a.csv"))}
    assert rows["logits"]["plan.kd.signal"] == "logits" and rows["sequence"]["plan.kd.signal"] == "sequence"
    assert float(rows["sequence"]["generation.teacher_pass_s_per_step"]) > 0
    # A job resolved once has every [kd] field set: its defaults are not mistaken for logit-KD settings.
    r = kdplan_cli("whatif", *DS, "--sweep", "gpus=64", "--csv", tmp_path / "b.csv")
    assert r.returncode == 0, r.stderr
    (row,) = csv.DictReader(open(tmp_path / "b.csv"))
    assert row["feasible"] == "True" and row["plan.kd.signal"] == "sequence"
