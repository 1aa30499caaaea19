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
