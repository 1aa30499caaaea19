import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_kdplan(*args, cwd=None, timeout=300, env=None):
    """Drive the real CLI in a subprocess; returns CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kdplan.cli.main", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=e)


@pytest.fixture
def kdplan_cli():
    return run_kdplan


def spawn_gloo(worker, nprocs: int = 2) -> dict:
    """Run ``worker(rank, world, port, queue)`` in ``nprocs`` spawned processes (gloo on a free
    loopback port); each worker puts ``(rank, result)`` on the queue. Returns {rank: result}."""
    import socket

    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(nprocs, port, q), nprocs=nprocs, join=True, start_method="spawn")
    return dict(q.get() for _ in range(nprocs))
