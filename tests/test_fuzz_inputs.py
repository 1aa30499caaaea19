"""Fuzz every input file kdplan reads (HF config.json, cluster YAML, hardware YAML, job TOML):
one structural mutation or raw damage per case, then `kdplan plan` in-process.
See tests/fuzzing.py for the contract each case must meet."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import check, damaged, dump, fuzz_settings, invoke, mutated, tiny_llama, write
from kdplan.profiles import profiles_dir

SMALL = ["--seq-len", "128", "--global-batch", "8"]  # keeps a valid mutation's plan under a second

HF_BASES = {
    "llama": tiny_llama(),
    "qwen2": tiny_llama(model_type="qwen2", attention_bias=True, rope_parameters={"rope_theta": 1e6}),
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 256, "vocab_size": 1000,
             "n_positions": 512, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "gpt_neox": {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 512,
                 "rotary_emb_base": 10000.0, "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
}


@st.composite
def file_case(draw, bases: dict, suffix: str):
    """(bytes, leaf field or None): a structural mutation, or raw damage to a valid file."""
    base = bases[draw(st.sampled_from(sorted(bases)))]
    if draw(st.integers(0, 3)) == 0:
        return draw(damaged(dump(base, suffix).decode())), None
    data, leaf = draw(mutated(base))
    return dump(data, suffix), leaf


def hf_args(tmp_path, content, role):
    cfg = tmp_path / "config.json"
    write(cfg, content)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(tiny_llama()))
    models = (["--teacher", "none", "--student", cfg] if role == "student"
              else ["--teacher", cfg, "--student", other])
    return ["plan", *models, "--cluster", "cpu-local", "--gpus", "2", *SMALL, "-o", tmp_path / "plan.json"]


def test_fuzz_hf_config(tmp_path):
    codes = Counter()

    @fuzz_settings(80)
    @given(case=file_case(HF_BASES, ".json"), role=st.sampled_from(["student", "teacher"]))
    def one(case, role):
        content, leaf = case
        args = hf_args(tmp_path, content, role)
        codes[check(invoke(args), names="config.json", field=leaf, args=args)] += 1

    one()
    assert codes[0] and codes[2], codes  # both valid and refused mutations were exercised


def _cluster_bases() -> dict:
    by_name = yaml.safe_load((profiles_dir() / "clusters" / "cpu-local.yaml").read_text())
    gpu = yaml.safe_load((profiles_dir() / "hardware" / "cpu-core.yaml").read_text())["gpu"]
    inline = json.loads(json.dumps(by_name)) | {"gpus": {"cpu-core": gpu}}
    mixed = yaml.safe_load((profiles_dir() / "clusters" / "mixed-a100-h100.yaml").read_text())
    return {"by-name": by_name, "inline-gpu": inline, "mixed": mixed}


def test_fuzz_cluster_yaml(tmp_path):
    codes = Counter()
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))

    @fuzz_settings(80)
    @given(case=file_case(_cluster_bases(), ".yaml"))
    def one(case):
        content, leaf = case
        path = tmp_path / "cluster.yaml"
        write(path, content)
        args = ["plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", path, "--gpus", "2",
                *SMALL, "-o", tmp_path / "plan.json"]
        # --gpus 2 cannot split a mixed cluster evenly: that error rightly names the flag instead
        codes[check(invoke(args), names=("cluster.yaml", "--gpus 2"), field=leaf, args=args)] += 1

    one()
    assert codes[0] and codes[2], codes


HW_BASES = {"cpu-core": yaml.safe_load((profiles_dir() / "hardware" / "cpu-core.yaml").read_text())}


@pytest.fixture(scope="module")
def profile_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    shutil.copytree(profiles_dir(), root, dirs_exist_ok=True)
    return root


def test_fuzz_hardware_yaml(tmp_path, profile_copy):
    """A damaged profiles/hardware/*.yaml, found by name through the cpu-local preset."""
    codes = Counter()
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    args = ["plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", "cpu-local", "--gpus", "2",
            *SMALL, "-o", tmp_path / "plan.json"]

    @fuzz_settings(60)
    @given(case=file_case(HW_BASES, ".yaml"))
    def one(case):
        content, leaf = case
        write(profile_copy / "hardware" / "cpu-core.yaml", content)
        res = invoke(args, env={"KDPLAN_PROFILES": str(profile_copy)})
        codes[check(res, names="cpu-core.yaml", field=leaf, args=args)] += 1

    one()
    assert codes[0] and codes[2], codes


JOB_BASE = {
    "teacher": "teacher.json", "student": "student.json", "cluster": "cpu-local", "gpus": 2, "seq_len": 128,
    "global_batch": 8, "precision": "bf16", "tokens": 1e9,
    "kd": {"loss": "forward_kl", "temperature": 2.0, "alpha": 0.5, "beta": 0.5, "min_topk": 8,
           "allowed_compressions": ["dense", "topk:64", "topk:32:8"]},
    "fix": {"student.zero": "1"},
    "solver": {"objective": "time", "time_limit_s": 10.0, "mip_gap": 0.0, "top_k_alternatives": 2},
    "run": {"steps": 10, "lr": 0.001, "seed": 3, "checkpoint_every": 5, "output_dir": "runs/fuzz"},
}


def job_dir(tmp_path):
    (tmp_path / "teacher.json").write_text(json.dumps(tiny_llama(num_hidden_layers=4, hidden_size=128)))
    (tmp_path / "student.json").write_text(json.dumps(tiny_llama()))
    return tmp_path / "job.toml"


def test_fuzz_job_toml(tmp_path):
    codes = Counter()
    job = job_dir(tmp_path)
    args = ["plan", job, "-o", tmp_path / "plan.json"]

    @fuzz_settings(80)
    @given(case=file_case({"job": JOB_BASE}, ".toml"))
    def one(case):
        content, leaf = case
        write(job, content)
        codes[check(invoke(args), names="job.toml", field=leaf, args=args)] += 1

    one()
    assert codes[0] and codes[2], codes


@pytest.mark.parametrize("base", sorted(HF_BASES))
def test_hf_bases_plan(tmp_path, base):
    """The fuzzers start from valid files: unmutated, each plans (exit 0)."""
    args = hf_args(tmp_path, dump(HF_BASES[base], ".json"), "student")
    assert check(invoke(args), args=args) == 0


def test_job_base_plans(tmp_path):
    job = job_dir(tmp_path)
    write(job, dump(JOB_BASE, ".toml"))
    args = ["plan", job, "-o", tmp_path / "plan.json"]
    assert check(invoke(args), args=args) == 0


# ---- hand-picked cases the strategies reach only by luck ------------------------------------

HOSTILE = {
    "huge-int": "a = " + "9" * 5000 + "\n",
    "yaml-self-alias": "&a [*a]\n",
    "yaml-laughs": "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")),
    "yaml-python-tag": "!!python/object/apply:os.system ['touch /tmp/kdplan-pwned']\n",
    "deep": "[" * 100_000 + "]" * 100_000,
    "nul": "\x00" * 64,
    "latin1": "name: caf\xe9\n",
}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file(tmp_path, name, suffix):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(HOSTILE[name].encode("latin-1" if name == "latin1" else "utf-8"))
    if suffix == ".toml":
        args = ["plan", path, "-o", tmp_path / "plan.json"]
    elif suffix == ".yaml":
        args = ["plan", "--teacher", "none", "--student", "gpt-1.3b", "--cluster", path]
    else:
        args = ["plan", "--teacher", "none", "--student", path]
    res = invoke(args, timeout_s=20)
    assert check(res, names=f"input{suffix}", args=args) == 2
    assert not Path("/tmp/kdplan-pwned").exists()


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom", "/"])
def test_special_files_are_refused(special):
    args = ["inspect", special]
    assert check(invoke(args, timeout_s=10), names=special, args=args) == 2


def test_config_without_json_suffix_is_named_as_given(tmp_path):
    """A config.json saved under another name is read as JSON; errors name the real file."""
    path = tmp_path / "model.cfg"
    path.write_text('{"model_type": "llama", "num_hidden_layers": "two"}')
    args = ["plan", "--teacher", "none", "--student", path]
    res = invoke(args)
    assert check(res, names="model.cfg", args=args) == 2 and "model.json" not in res.stderr
