"""How often a 2-process gloo DDP worker aborts at exit, with and without collecting garbage
before destroying the process group (executor.mesh.close_process_group).

    OMP_NUM_THREADS=1 python benchmarks/gloo_exit_abort.py [--runs 20]

Each run spawns 2 processes that train a small DDP model for 30 steps, then exit. With torch 2.13
a DDP model left in a reference cycle is freed at interpreter exit, after destroy_process_group,
and its reducer's teardown aborts the process ("terminate called without an active exception",
SIGABRT). Prints, per mode, how many of the runs had a worker die.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def _worker(rank: int, world: int, port: int, collect: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    ddp = DDP(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)), bucket_cap_mb=0.01)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(30):
        loss = ddp(torch.randn(32, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    del ddp, opt, loss
    if collect:
        gc.collect()
    dist.destroy_process_group()


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    for collect in (False, True):
        died = 0
        for _ in range(args.runs):
            try:
                mp.start_processes(_worker, args=(2, _port(), collect), nprocs=2, join=True, start_method="spawn")
            except mp.ProcessExitedException:
                died += 1
        label = "gc.collect() before destroy" if collect else "destroy only"
        print(f"{label:28}: a worker died in {died} of {args.runs} runs")


if __name__ == "__main__":
    main()
