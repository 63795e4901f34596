"""Distributed helpers. Everything here also works with no process group (world size 1).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them and picks nccl on
GPUs and gloo on CPU, so the same script runs as `python x.py` and as `torchrun ... x.py`, and a
two-process CPU test exercises the same code paths as an 8-GPU node.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None, timeout_s: int = 600) -> torch.device:
    """Initialise from torchrun's environment when present; return the device this rank uses.

    device: "cuda", "cpu" or None (cuda when available). With WORLD_SIZE unset or 1 no process
    group is created and everything below degrades to single-process behaviour.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not is_dist():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if dev.type == "cuda" else None,
            )
        except Exception as e:  # a rank that cannot reach the others says so plainly
            addr = os.environ.get("MASTER_ADDR", "?")
            port = os.environ.get("MASTER_PORT", "?")
            raise RuntimeError(
                f"rank {os.environ.get('RANK')} could not join the process group at "
                f"{addr}:{port} ({backend}): {e}"
            ) from e
    return dev


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its slice.

    Every rank's loss depends on every rank's embeddings (they are each other's negatives), so
    the gradient of the *total* loss w.r.t. this rank's slice is the sum over ranks of the
    gradients they computed for it: all-reduce, then keep the own slice. Keeping only the local
    gradient (a common bug) drops the negatives' contribution from the other ranks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(ws)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(s.item()) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"all_gather_with_grad needs equal sizes on every rank, got {sizes}")
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world_size * n, ...] in rank order; identity without a group."""
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Gradient-free all-gather along dim 0 (sizes may differ between ranks)."""
    if get_world_size() == 1:
        return x
    ws = get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(sizes) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    xp = torch.cat([x, pad], 0).contiguous()
    out = [torch.empty_like(xp) for _ in range(ws)]
    dist.all_gather(out, xp)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], 0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / get_world_size()


def broadcast_object(obj):
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP when a process group is up; converts BatchNorm to SyncBatchNorm first is the caller's choice."""
    if get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if is_dist():
        dist.barrier()
