"""Shared machinery of the fuzz suites (tests/test_fuzz_*.py).

Each suite starts from a valid file, mutates it (one structural change to the parsed data, or
raw damage to the text), writes it, and drives the CLI in-process. The contract every case
must meet (issue 8, item 4): exit 0 (the mutation happened to be valid) or 3 (valid but
infeasible), or exit 2 with exactly one line on stderr that names the file, and the field
where the mutation changed a value's type. Never a traceback, never exit 1, never a hang.

Reproducible by default (derandomize=True: the same examples every run, no example database);
KDPLAN_FUZZ=explore draws fresh random examples, KDPLAN_FUZZ_EXAMPLES=N changes the count.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
from contextlib import contextmanager

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdplan import profiles
from kdplan.cli.main import app

EXPLORE = os.environ.get("KDPLAN_FUZZ") == "explore"


def fuzz_settings(n: int) -> settings:
    """Bounded, deadline-free, reproducible unless exploring. tmp_path is shared by the examples
    of one test on purpose: each example overwrites its file."""
    return settings(max_examples=int(os.environ.get("KDPLAN_FUZZ_EXAMPLES", n)), deadline=None,
                    derandomize=not EXPLORE, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ---- values a mutation puts in place of a good one ------------------------------------------

HUGE = [10**30, -(10**30), 2**63, -1, 0, 1e308, -1e308, 1e-320]
NONFINITE = [math.nan, math.inf, -math.inf]
NASTY_TEXT = ["", " ", "\x00", "[/x]", "[bold]", ":smile:", "../../etc/passwd", "a\nb", "\u202e", "é日本🤖",
              "x" * 5000, "none", "null", "-1", "1e999", "$(touch /tmp/kdplan-pwned)", "`id`", "; rm -rf /",
              "sparse:4", "x|", "topk:0", "topk:64:3", "[/x]"]  # malformed formats (issue 18: kd.compression)


def scalars() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(HUGE + NONFINITE + NASTY_TEXT + [None, True, False]),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
    )


def bad_values() -> st.SearchStrategy:
    """Scalars, containers of them, and deep nesting."""
    deep = st.integers(min_value=50, max_value=900).map(lambda d: json.loads("[" * d + "]" * d))
    return st.one_of(scalars(), st.lists(scalars(), max_size=4),
                     st.dictionaries(st.text(max_size=8), scalars(), max_size=3), deep)


def kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    return type(v).__name__


def depth(v) -> int:
    d = 0
    while isinstance(v, (list, dict)) and v:
        v = v[0] if isinstance(v, list) else next(iter(v.values()))
        d += 1
    return d + isinstance(v, (list, dict))


# ---- structural mutations of parsed data ----------------------------------------------------

def paths(obj, prefix=()):
    """Every (path, value) in a tree of dicts and lists, parents before children."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def _parent(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    return node


@st.composite
def mutated(draw, base: dict):
    """(data, leaf): ``base`` deep-copied with one change. ``leaf`` names the field whose value
    changed JSON type (the error must name it), else None."""
    data = json.loads(json.dumps(base))
    all_paths = [p for p, _ in paths(data) if p]
    op = draw(st.sampled_from(["set", "set", "set", "delete", "extra", "root"]))
    if op == "root":
        return draw(st.one_of(bad_values(), st.just([data]))), None
    path = draw(st.sampled_from(all_paths))
    parent = _parent(data, path)
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
        return data, None
    if op == "extra":  # an unknown key in any mapping
        target = draw(st.sampled_from([v for _, v in paths(data) if isinstance(v, dict)]))
        target[draw(st.text(min_size=1, max_size=12))] = draw(scalars())
        return data, None
    old, new = parent[path[-1]], draw(bad_values())
    parent[path[-1]] = new
    changed = (kind(new) not in ("null", kind(old)) and {kind(new), kind(old)} != {"bool", "num"}
               and depth(new) < 20)  # a parser refuses deep nesting before any field is read
    leaf = next((p for p in reversed(path) if isinstance(p, str)), None)
    return data, leaf if changed else None


# ---- raw damage to text ---------------------------------------------------------------------

@st.composite
def damaged(draw, text: str) -> bytes:
    raw = text.encode()
    op = draw(st.sampled_from(["truncate", "insert", "junk", "empty", "flip", "bom"]))
    if op == "truncate":
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    if op == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    if op == "junk":
        return draw(st.binary(max_size=256))
    if op == "empty":
        return draw(st.sampled_from([b"", b" \n\t ", b"\n"]))
    if op == "flip":
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return b"\xef\xbb\xbf" + raw  # a UTF-8 byte-order mark, as some editors write


# ---- serialisation in each file's own format ------------------------------------------------

def _toml_str(v) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also forbids a raw DEL."""
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k) -> str:
    return _toml_str(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return _toml_str(v)


def to_toml(data) -> str:
    """A tiny TOML writer for fuzzed job files (TOML has no null: None values are left out)."""
    if not isinstance(data, dict):
        return f"value = {_toml_value(data)}\n"
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()
             if v is not None and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def dump(data, suffix: str) -> bytes:
    try:
        if suffix == ".toml":
            text = to_toml(data)
        elif suffix == ".json":
            text = json.dumps(data, ensure_ascii=False)
        else:
            text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (ValueError, RecursionError):  # too deep or an int over 4300 digits: write it raw
        text = "[" * 5000 + "]" * 5000
    return text.encode("utf-8", "surrogatepass")


# ---- driving the CLI and checking the contract ----------------------------------------------

RUNNER = CliRunner()


class Hang(BaseException):
    """BaseException so that the CLI's own error boundary cannot swallow it."""


@contextmanager
def time_limit(seconds: float):
    """SIGALRM in the main thread turns a hang into a test failure instead of a stuck CI job."""
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def invoke(args, env=None, timeout_s: float = 30.0):
    """Run the CLI in-process with fresh profile caches (fuzzed files reuse their names)."""
    profiles.load_hardware.cache_clear()
    profiles._load_cluster_file.cache_clear()
    # Run in a scratch folder: fuzzed flags may name relative output files (e.g. `-o 64`).
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="kdplan-fuzz-") as scratch:
        os.chdir(scratch)
        try:
            with time_limit(timeout_s):
                return RUNNER.invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)
        finally:
            os.chdir(cwd)


def check(res, *, names: str | tuple[str, ...] | None = None, field: str | None = None, args=()) -> int:
    """Assert the bad-input contract; returns the exit code."""
    what = f"kdplan {' '.join(map(str, args))[:300]}"
    exc = res.exception
    if exc is not None and not isinstance(exc, SystemExit):
        import traceback
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}\n{tb}")
    err = res.stderr
    assert "Traceback" not in err + res.stdout, f"{what}: traceback\n{err}"
    assert res.exit_code in (0, 2, 3), f"{what}: exit {res.exit_code}\n{err}"
    if res.exit_code in (2, 3):
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr, expected one:\n{err}"
        assert lines[0].startswith("error:"), f"{what}: {lines[0]}"
    if res.exit_code == 2 and names is not None:
        names = (names,) if isinstance(names, str) else names
        assert any(n in err for n in names), f"{what}: the message names none of {names}: {err}"
    if res.exit_code == 2 and field is not None:
        assert str(field) in err, f"{what}: the message does not name field {field!r}: {err}"
    return res.exit_code


def write(path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


def tiny_llama(**over) -> dict:
    """A small Llama config.json: plans in well under a second on cpu-local."""
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000,
           "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False}
    cfg.update(over)
    return cfg
