"""Run a function on W gloo processes on the CPU (torch.multiprocessing.spawn,
a free port on 127.0.0.1). Results come back through files the ranks write."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; raises if one fails."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
