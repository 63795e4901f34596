"""Run a function in N CPU processes with a gloo process group, as torchrun would."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, out, kwargs, timeout_s=120):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from common import dist

    dist.init_distributed("cpu", timeout_s=timeout_s)
    try:
        torch.save(fn(rank=rank, world=world, **kwargs), f"{out}/rank{rank}.pt")
    finally:
        dist.cleanup()


def run_distributed(fn, world: int, tmp_path, timeout_s: int = 120, **kwargs) -> list:
    """fn(rank=, world=, **kwargs) in `world` processes whose collectives time out after
    `timeout_s`; returns each rank's return value."""
    args = (world, free_port(), fn, str(tmp_path), kwargs, timeout_s)
    mp.spawn(_entry, args=args, nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
