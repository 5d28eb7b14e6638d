"""Run a function on W gloo processes on the CPU (torch.multiprocessing.spawn). The
ranks meet through a file in a fresh directory, not a TCP port, so that runs side by
side cannot take each other's port. Results come back through files the ranks write."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rendezvous(directory: str) -> str:
    """An ``init_method`` for ranks on this machine: a file that does not exist yet."""
    return "file://" + os.path.join(directory, "rendezvous")


def _entry(rank: int, world_size: int, init_method: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; raises if one fails."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_entry, args=(world_size, rendezvous(directory), fn, args), nprocs=world_size, join=True)
