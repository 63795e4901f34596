"""Distributed helpers. Everything here also works with no process group (world size 1).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them and picks nccl on
GPUs and gloo on CPU, so the same script runs as `python x.py` and as `torchrun ... x.py`, and a
two-process CPU test exercises the same code paths as an 8-GPU node.
"""

from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist


class DistInitError(RuntimeError):
    """This rank could not join the process group (unreachable master, missing ranks)."""


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
            raise DistInitError(
                f"rank {os.environ.get('RANK')} could not join the process group at "
                f"{addr}:{port} ({backend}) within {timeout_s} s: {e}"
            ) from e
    return dev


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


# Backends (by name) whose process group lacked all_gather_into_tensor / reduce_scatter_tensor
# the first time they were tried: those use the list all-gather and all-reduce + slice instead.
_NO_TENSOR_COLLECTIVES: set[str] = set()
# Set once the equal-size check of all_gather_with_grad has run in this process.
_GATHER_SIZES_CHECKED = False


def _tensor_collective(name: str, fn, fallback):
    """fn() with the tensor collective, or fallback() where the backend lacks it (checked once
    per backend: every rank of a group has the same backend, so all take the same branch)."""
    backend = str(dist.get_backend())
    if backend not in _NO_TENSOR_COLLECTIVES:
        try:
            with warnings.catch_warnings():
                # torch >= 2.12 renames these (all_gather_single, reduce_scatter_single); the
                # names used here are those of torch 2.11, which the GPU machines run
                warnings.simplefilter("ignore", FutureWarning)
                return fn()
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            if backend == "nccl":  # nccl has both: a real error, not a missing feature
                raise
            _NO_TENSOR_COLLECTIVES.add(backend)
            warnings.warn(
                f"{name} is not supported by {backend} ({e}); using the list fallback",
                stacklevel=3,
            )
    return fallback()


def _check_equal_sizes(x: torch.Tensor) -> None:
    """First call only: all ranks gather with equal leading sizes (a data loader with
    drop_last / DistributedSampler keeps them equal afterwards). Once, because reading the
    sizes back is a host sync that a training step should not pay every time."""
    global _GATHER_SIZES_CHECKED
    if _GATHER_SIZES_CHECKED:
        return
    ws = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    got = [int(s.item()) for s in sizes]
    if len(set(got)) != 1:
        raise ValueError(f"all_gather_with_grad needs equal sizes on every rank, got {got}")
    _GATHER_SIZES_CHECKED = True


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its slice.

    Every rank's loss depends on every rank's embeddings (they are each other's negatives), so
    the gradient of the *total* loss w.r.t. this rank's slice is the sum over ranks of the
    gradients they computed for it: a reduce-scatter (sum) of the [world * n, ...] gradient.
    Keeping only the local gradient (a common bug) drops the negatives' contribution from the
    other ranks. Forward: all_gather_into_tensor into one buffer; backward: reduce_scatter_tensor
    (each rank receives only its own n rows, not the whole summed gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws = dist.get_world_size()
        x = x.contiguous()
        _check_equal_sizes(x)
        out = x.new_empty((ws * x.shape[0], *x.shape[1:]))

        def fallback() -> torch.Tensor:
            dist.all_gather(list(out.chunk(ws)), x)
            return out

        ctx.rank, ctx.ws = dist.get_rank(), ws
        return _tensor_collective(
            "all_gather_into_tensor",
            lambda: (dist.all_gather_into_tensor(out, x), out)[1],
            fallback,
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.ws
        out = grad.new_empty((n, *grad.shape[1:]))

        def fallback() -> torch.Tensor:
            full = grad.clone()
            dist.all_reduce(full, op=dist.ReduceOp.SUM)
            return full[ctx.rank * n : (ctx.rank + 1) * n]

        return _tensor_collective(
            "reduce_scatter_tensor",
            lambda: (dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM), out)[1],
            fallback,
        )


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world_size * n, ...] in rank order; identity without a group.
    n must be equal on every rank (checked on the first call)."""
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


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: d(sum over ranks)/d(own input) routes every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks, on any device (gloo included).

    SimCLR uses global BN so that a network cannot cheat the contrastive task with per-device
    statistics. torch's SyncBatchNorm only runs on GPUs; this one all-reduces [sum, sum of
    squares, count] with a differentiable all-reduce, so its gradients are exact too, and a
    two-process CPU run computes the same thing as one process with the whole batch.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        # fp64 sums: E[x^2] - E[x]^2 in fp32 loses digits when the mean is large
        xd = xf.double()
        stats = _AllReduceSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count.double()]))
        c = x.shape[1]
        n = stats[-1]
        mean = (stats[:c] / n).float()
        var = (stats[c : 2 * c] / n - (stats[:c] / n) ** 2).clamp_min(0).float()  # biased, as BN
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_bn(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Make every BatchNorm global across ranks: SyncBatchNorm on GPU, GlobalBatchNorm on CPU."""
    if get_world_size() == 1:
        return model
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        out = m
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            out = GlobalBatchNorm(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
            )
            out.load_state_dict(m.state_dict())
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(model)
