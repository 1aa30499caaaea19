"""Bad input exits 2 with one clear line on stderr and no traceback (driving the real CLI)."""

import json

import pytest

from conftest import run_kdplan

BAD = [
    (["plan", "--teacher", "no-such-model"], "unknown model preset"),
    (["plan", "--student", "nope"], "unknown model preset"),
    (["plan", "--cluster", "no-such-cluster"], "unknown cluster preset"),
    (["plan", "--gpus", "12"], "whole number"),
    (["plan", "--gpus", "0"], "gpus"),
    (["plan", "--fix", "student.tp"], "KEY=VALUE"),
    (["plan", "--fix", "student.bogus=1"], "unknown key"),
    (["plan", "--fix", "student.tp=abc"], "positive integer"),
    (["plan", "--fix", "student.zero=7"], "0, 1, 2 or 3"),
    (["plan", "--fix", "kd.compression=topk:0"], "K must be"),
    (["plan", "--fix", "kd.compression=topk:64:3"], "BITS"),
    (["plan", "--fix", "student.recompute=sometimes"], "expected one of"),
    (["plan", "--precision", "fp8"], "precision"),
    (["plan", "--seq-len", "100000"], "max positions"),
    (["plan", "--teacher", "none", "--fix", "teacher.tp=2"], "no teacher"),
    (["plan", "--teacher", "llama-3-8b", "--student", "gpt-1.3b", "--fix", "kd.loss=jsd"], "vocabulary"),
    (["plan", "missing-job.toml"], "no such file"),
    (["inspect", "missing-plan.json"], "no such file"),
    (["schema", "nonsense"], "unknown schema"),
]


def test_validate_with_a_missing_report_fails_before_any_table():
    """The report paths are read first: one error line, no published-runs tables printed ahead of it."""
    r = run_kdplan("validate", "missing-report.json")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "no such file" in r.stderr.lower() and "Traceback" not in r.stderr + r.stdout
    assert "published runs" not in r.stdout, r.stdout[:300]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_exit_2(args, needle):
    r = run_kdplan(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert needle.lower() in r.stderr.lower(), r.stderr


BAD_FILES = [
    ("job.toml", "", "empty"),
    ("job.toml", "teacher = ", "invalid TOML"),
    ("job.toml", 'teacher = "gpt-13b"\nbogus = 1\n', "bogus"),
    ("job.toml", 'global_batch = "many"\n', "global_batch"),
    ("job.toml", "global_batch = -4\n", "global_batch"),
    ("job.toml", "seq_len = nan\n", "finite"),
    ("job.toml", '[kd]\ntemperature = 0\n', "temperature"),
    ("job.toml", 'cluster = "c.yaml"\n', "no such file"),
    ("job.toml", 'student = "cfg.json"\n', "no such file"),
]


@pytest.mark.parametrize("name,text,needle", BAD_FILES, ids=[t[:20] for _, t, _ in BAD_FILES])
def test_bad_job_files_exit_2(tmp_path, name, text, needle):
    p = tmp_path / name
    p.write_text(text)
    r = run_kdplan("plan", p, "-o", tmp_path / "plan.json")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert needle.lower() in r.stderr.lower(), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_hf_config_names_missing_field(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": 50257, "max_position_embeddings": 4096}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    r = run_kdplan("plan", "--student", p, "--teacher", "none", "-o", tmp_path / "x.json")
    assert r.returncode == 2 and "num_hidden_layers" in r.stderr and "Traceback" not in r.stderr


def test_unsupported_model_type(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    r = run_kdplan("plan", "--student", p, "--teacher", "none")
    assert r.returncode == 2 and "not supported" in r.stderr


def test_bad_cluster_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ngroups:\n  - num_nodes: 1\n    node: {gpu: a100-80g}\n")
    r = run_kdplan("plan", "--cluster", p)
    assert r.returncode == 2 and "gpus_per_node" in r.stderr and "Traceback" not in r.stderr


def test_help_shows_whole_surface():
    r = run_kdplan("--help")
    assert r.returncode == 0
    for cmd in ("plan", "inspect", "simulate", "whatif", "profile", "run", "calibrate", "validate", "schema"):
        assert cmd in r.stdout
    r = run_kdplan("plan", "--help")
    for flag in ("--teacher", "--student", "--cluster", "--gpus", "--seq-len", "--global-batch",
                 "--precision", "--fix", "--json"):
        assert flag in r.stdout, flag
