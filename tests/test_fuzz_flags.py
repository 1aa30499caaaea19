"""Fuzz every flag of `kdplan plan` (and the commands that plan), in-process; then prove with a
few real subprocess runs that the in-process results are what a user sees."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_kdplan
from fuzzing import HUGE, NASTY_TEXT, check, fuzz_settings, invoke, tiny_llama
from kdplan.pins import PIN_KEYS

VALUE_FLAGS = ["--teacher", "--student", "--cluster", "--gpus", "--seq-len", "--global-batch", "--precision",
               "--fix", "--min-topk", "--objective", "--tokens", "--top", "-o"]


def flag_values() -> st.SearchStrategy[str]:
    good = ["none", "gpt-1.3b", "llama-3-8b", "cpu-local", "dgx-a100-80g", "bf16", "fp32", "time", "cost",
            "1", "2", "4", "8", "64", "128", "1e9"]
    return st.one_of(
        st.sampled_from(good + NASTY_TEXT + [str(h) for h in HUGE] + ["nan", "inf", "-inf", "0x10", "1_000", "٣"]),
        st.integers(-(2**66), 2**66).map(str),
        st.floats().map(repr),
        st.text(max_size=30),
    )


def fix_values() -> st.SearchStrategy[str]:
    key = st.one_of(st.sampled_from(sorted(PIN_KEYS)), st.text(max_size=12))
    val = st.one_of(st.sampled_from(["1", "2", "0", "-1", "true", "full", "topk:64", "topk:64:8", "topk:0",
                                     "topk:64:3", "dense", "weights", "colocated", "offline", ""]), st.text(max_size=12))
    return st.one_of(st.builds(lambda k, v: f"{k}={v}", key, val), st.text(max_size=20))


# what a dropped flag falls back to (the seed job's values: kdplan.jobs.load_job(None))
DEFAULTS = {"--teacher": ["gpt-13b"], "--student": ["gpt-1.3b"], "--cluster": ["dgx-a100-80g"],
            "--seq-len": ["2048"], "--global-batch": ["512"]}


@st.composite
def plan_args(draw, tmp):
    """(argv, culprits): a valid small `plan` command line with one to three flags changed, added
    or dropped; ``culprits`` are the strings a refusal may name to say what is at fault (the flags
    and values changed, the option or argument added, the files named)."""
    args = {"--teacher": "none", "--student": str(tmp / "s.json"), "--cluster": "cpu-local", "--gpus": "2",
            "--seq-len": "128", "--global-batch": "8", "-o": str(tmp / "plan.json")}
    extra: list[str] = []
    culprits: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "fix", "fix", "drop", "bare", "unknown", "positional", "json"]))
        flag = draw(st.sampled_from(VALUE_FLAGS))
        if op == "set":
            args[flag] = draw(flag_values())
            culprits |= {flag, args[flag]}
        elif op == "fix":
            extra += ["--fix", draw(fix_values())]
            culprits |= {"--fix", extra[-1], extra[-1].split("=", 1)[0]}
        elif op == "drop":  # the flag's default takes over and may be what is at fault
            args.pop(flag, None)
            culprits |= {flag, *DEFAULTS.get(flag, ())}
        elif op == "bare":  # a flag with its value missing, at the end of the line
            extra.append(flag)
            culprits.add(flag)
        elif op == "unknown":
            extra.append("--" + draw(st.text(min_size=1, max_size=10)))
            culprits.add(extra[-1])
        elif op == "positional":
            extra.append(draw(st.text(min_size=1, max_size=10)))
            culprits.add(extra[-1])
        else:
            extra.append("--json")
    line = ["plan"] + [x for kv in args.items() for x in kv]
    return line + extra, culprits


def _unescape(text: str) -> str:
    """The message with the escapes one_line and click write (\\n, \\x0a, \\u2028...) decoded."""
    def one(m):
        e = m.group(1)
        return {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}.get(e) or chr(int(e[1:], 16))
    return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrt\\])", one, text)


def named(err: str, culprits: set[str]) -> bool:
    """Does the one-line refusal name one of the culprits? Compared as given, stripped, as
    one_line shows it, as a normalised path, and with the message's escapes decoded; an empty
    value is named by saying it is empty."""
    from kdplan.cli.common import one_line
    decoded = _unescape(err)
    forms = {f for c in culprits if c.strip() for f in (c, c.strip(), one_line(c), os.path.normpath(c))}
    forms |= {c[:2] for c in culprits if c.startswith("-") and not c.startswith("--")}  # click: "-ab" is -a -b
    if any(not c.strip() for c in culprits) and "empty" in err:
        return True
    return any(f in err or f in decoded for f in forms)


def test_fuzz_plan_flags(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    codes = Counter()

    @fuzz_settings(100)
    @given(case=plan_args(tmp_path))
    def one(case):
        args, culprits = case
        res = invoke(args, timeout_s=60)
        codes[check(res, args=args)] += 1
        if res.exit_code == 2:  # every refusal names what is at fault: a flag, a file, or the value itself
            assert named(res.stderr, culprits), (args, res.stderr, sorted(culprits))

    one()
    assert codes[0] and codes[2], codes


@pytest.mark.parametrize("flag,value", [
    ("--gpus", "-3"), ("--gpus", "0"), ("--gpus", str(2**70)), ("--gpus", "abc"), ("--gpus", "nan"),
    ("--seq-len", "-1"), ("--seq-len", "99999999999"), ("--global-batch", "0"), ("--global-batch", "1.5"),
    ("--precision", "fp8"), ("--objective", "money"), ("--tokens", "nan"), ("--tokens", "-inf"),
    ("--tokens", "-5"), ("--min-topk", "0"), ("--top", "1000"), ("--cluster", "[/x]"), ("--student", "[bold]"),
    ("--teacher", ":smile:\n"), ("--cluster", "nope\u2028x"), ("-o", "/proc/no/such.json"),
])
def test_bad_flag_names_the_flag(tmp_path, flag, value):
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    args = ["plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", "cpu-local", "--gpus", "2",
            "--seq-len", "128", "--global-batch", "8", "-o", tmp_path / "plan.json", flag, value]
    names = (flag, "/proc/no/such.json") if flag == "-o" else flag
    assert check(invoke(args), names=names, args=args) == 2


@pytest.mark.parametrize("args", [["plan", "--gpus"], ["plan", "--bogus"], ["nosuch"], ["--bogus"], ["inspect"],
                                  ["plan", "a.toml", "b.toml"], ["whatif", "--sweep"], ["simulate"]])
def test_usage_errors_are_one_line(args):
    assert check(invoke(args), args=args) == 2


# ---- the in-process results are what a user sees --------------------------------------------

SUBPROCESS_CASES = [
    (["plan", "--gpus", "abc"], 2, "--gpus"),
    (["plan", "--teacher", "[/x]"], 2, "[/x]"),
    (["plan", "--fix", "student.tp=0"], 2, "student.tp"),
    (["plan", "--cluster", "/dev/zero"], 2, "not a regular file"),
    (["inspect", "/"], 2, "directory"),
]


@pytest.mark.parametrize("args,code,needle", SUBPROCESS_CASES, ids=[" ".join(a) for a, _, _ in SUBPROCESS_CASES])
def test_subprocess_matches_in_process(args, code, needle):
    real = run_kdplan(*args, timeout=60)
    here = invoke(args)
    assert (real.returncode, here.exit_code) == (code, code), (real.stderr, here.stderr)
    # usage errors name the program as it was started; the entry point's name is `kdplan`
    assert real.stderr.strip().replace("python -m kdplan.cli.main", "kdplan") == here.stderr.strip()
    assert len(real.stderr.strip().splitlines()) == 1 and needle in real.stderr
    assert "Traceback" not in real.stderr + real.stdout


def test_json_stdout_is_only_the_plan(tmp_path):
    """`plan --json` prints the plan on stdout and nothing else (scripts pipe it to jq)."""
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    r = run_kdplan("plan", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", "cpu-local",
                   "--gpus", "2", "--seq-len", "128", "--global-batch", "8", "--json", "-o", tmp_path / "p.json",
                   timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema_version"]


# ---- kdplan whatif --sweep ------------------------------------------------------------------

SWEEP_KEYS = ["gpus", "cluster", "gpu", "intra_bw_scale", "inter_bw_scale", "seq_len", "global_batch", "student",
              "student.tp", "student.zero", "student.recompute", "kd.compression"]
# Ranges and lists that are either short or caught by the point-count guard before any planning.
SWEEP_FORMS = ["1..4x2", "64..128+64", "1,2,...,4", "8..", "..8", "1..1000000+1", "4..1x2", "1..4x0", "1..4+0",
               "1..4x1", "1,,2", ",", "...", "auto", "1..nan+1", "inf..1x2", "1e400", "2**70", "0..-4x2"]


@st.composite
def sweep_args(draw):
    items = []
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(SWEEP_KEYS), st.text(max_size=10)))
        if draw(st.booleans()):
            values = draw(st.sampled_from(SWEEP_FORMS))
        else:
            values = ",".join(draw(st.lists(flag_values(), min_size=1, max_size=3)))
        items += ["--sweep", draw(st.sampled_from([f"{key}={values}", key, f"={values}"]))]
    return items


def test_fuzz_whatif_sweeps(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(tiny_llama()))
    base = ["whatif", "--teacher", "none", "--student", tmp_path / "s.json", "--cluster", "cpu-local", "--gpus", "2",
            "--seq-len", "128", "--global-batch", "8", "--json"]
    codes = Counter()

    @fuzz_settings(40)
    @given(sweep=sweep_args())
    def one(sweep):
        args = base + sweep
        codes[check(invoke(args, timeout_s=120), args=args)] += 1

    one()
    assert codes[0] and codes[2], codes
