import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

os.environ.setdefault("OMP_NUM_THREADS", "1")


DEFAULT_OUTPUTS = {"plan": "plan.json", "calibrate": "calibrated.yaml", "profile": "profile.yaml"}
"""What a command writes into its working directory when not given -o / --output."""


def run_kdplan(*args, cwd=None, timeout=300, env=None):
    """Drive the real CLI in a subprocess (working directory: the checkout, so relative paths
    such as ``examples/...`` resolve); returns CompletedProcess. A command that writes a file
    by default (``plan``, ``calibrate``, ``profile``) and is given no -o / --output writes it into
    a temporary directory, removed afterwards, never into the checkout; a test that reads the file
    passes -o itself."""
    e = dict(os.environ)
    e.update(env or {})
    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="kdplan-test-") as scratch:
        if argv and argv[0] in DEFAULT_OUTPUTS and not {"-o", "--output"} & set(argv) \
                and not any(a.startswith("--output=") for a in argv) and "--help" not in argv:
            argv += ["-o", str(Path(scratch) / DEFAULT_OUTPUTS[argv[0]])]
        return subprocess.run([sys.executable, "-m", "kdplan.cli.main", *argv], cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=timeout, env=e)


def _root_outputs() -> dict[str, float]:
    return {n: (ROOT / n).stat().st_mtime_ns for n in (*DEFAULT_OUTPUTS.values(), "report.json")
            if (ROOT / n).exists()}


@pytest.fixture(autouse=True)
def _no_output_in_the_checkout():
    """A test must not write a CLI's default output (plan.json, report.json, calibrated.yaml,
    profile.yaml) into the checkout's root: .gitignore hides plan.json and report.json, and a
    later test or a user would read a stale file. Fails the test that did (pass -o tmp_path / ...)."""
    before = _root_outputs()
    yield
    after = _root_outputs()
    written = sorted(n for n, t in after.items() if before.get(n) != t)
    assert not written, f"the test wrote {written} into {ROOT}: give the command -o under tmp_path"


EXECUTOR_IMPORTS = ("torch", "executor", "exec_helpers")  # exec_helpers launches the executor


def _runs_the_executor(path: Path) -> bool:
    """Whether a test module imports torch, the executor or the helpers that launch it, anywhere
    (module or function level)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(n.split(".")[0] in EXECUTOR_IMPORTS for n in names):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Test tiers. The planner's tests (no torch) are the fast tier, ``pytest -m "not slow"``;
    a test in a module that needs torch or launches the executor is an executor test (marker
    ``executor``) and, like the tests marked ``slow`` by hand (long searches and fits, the wheel
    build), runs only in the full tier."""
    seen: dict[Path, bool] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in seen:
            seen[path] = path.suffix == ".py" and _runs_the_executor(path)
        if seen[path] or item.get_closest_marker("executor"):
            item.add_marker(pytest.mark.executor)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def kdplan_cli():
    return run_kdplan


def spawn_gloo(worker, nprocs: int = 2) -> dict:
    """Run ``worker(rank, world, port, queue)`` in ``nprocs`` spawned processes; each worker calls
    ``init_gloo(rank, world, port)`` and puts ``(rank, result)`` on the queue. Returns {rank: result}.

    The rendezvous store lives in this (parent) process, as torchrun's agent hosts it: with
    ``init_method="tcp://"`` rank 0 hosts it, and rank 0 exiting while rank 1 is still tearing down
    its process group aborted rank 0 ("terminate called without an active exception", seen once in CI).
    """
    import datetime
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    store = dist.TCPStore("127.0.0.1", port, nprocs, is_master=True, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    q = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(worker, args=(nprocs, port, q), nprocs=nprocs, join=True, start_method="spawn")
    finally:
        del store
    return dict(q.get() for _ in range(nprocs))


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """Join the gloo process group whose store ``spawn_gloo`` hosts on ``port``."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
