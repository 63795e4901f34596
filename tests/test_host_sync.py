"""One host sync per training step on CUDA, shown without a GPU.

One step of simclr.py, mae.py and rotnet.py (the batch feed, augmentation, forward, loss, the
step's flags and the optimizer step on fake gradients) runs on fake CUDA tensors
(FakeTensorMode: shapes, dtypes and devices, no data, no GPU), under a dispatch mode that logs
every op that makes the host wait for the device:
  - aten._local_scalar_dense (.item(), bool(t), float(t)),
  - ops whose output shape depends on the data (aten.nonzero, boolean-mask indexing, unique,
    ...: torch.Tag.dynamic_output_shape) and ops tagged data_dependent_output,
  - device-to-host copies (.tolist(), .cpu()) and host-to-device copies that are blocking or
    come from memory that was not pinned.
The count must be 1: TrainRun's flag read (docs/gpu.md states it).

What this cannot cover: the backward (the autograd engine needs a CUDA context for fake CUDA
tensors), checked instead with the same log on CPU tensors; the CUDA generator's creation and
seeding (host-side; a fake-CUDA step draws from the default generator); the fused NT-Xent
kernel (this build has no CUDA op: the loss is the reference); autocast (disabled without a
driver, so the forward runs in fp32); collectives (one process: DDP and SyncBatchNorm are
absent; docs/gpu.md counts SyncBatchNorm's syncs).
"""

from __future__ import annotations

import traceback
import types
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode

import mae
import rotnet
import simclr
from common.augment import AugConfig, BatchAugment
from common.backbones import build_backbone
from common.cli import apply_preset
from common.feed import BatchFeed
from common.schedule import LrSchedule
from common.train import TrainRun
from conftest import ROOT

aten = torch.ops.aten
N = 16  # images per step


class SyncLog(TorchDispatchMode):
    """Logs the ops that wait for the device; D2H copies return zeros (a fake tensor has no
    data to read), which is all that TrainRun's flags need to take the usual branch."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.where: list[str] = []  # the repository's innermost line that made each event
        self._pinned: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive: ids stay unique)

    def _log(self, event: str) -> None:
        self.events.append(event)
        frames = [f for f in traceback.extract_stack() if f"{ROOT}/" in f.filename]
        frames = [f for f in frames if "tests/test_host_sync.py" not in f.filename] or frames
        self.where.append(f"{event} at {frames[-1].filename}:{frames[-1].lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if func is aten._local_scalar_dense.default:
            self._log("item")
            return False if args[0].dtype == torch.bool else 0  # (a fake has no value)
        elif func is aten.index.Tensor:  # data-dependent only with a boolean mask
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self._log(f"dynamic shape: {name}")
        elif torch.Tag.dynamic_output_shape in func.tags:
            self._log(f"dynamic shape: {name}")
        elif torch.Tag.data_dependent_output in func.tags:
            self._log(f"data-dependent: {name}")
        src = dst = None
        if func is aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
        elif func is aten.copy_.default:
            src, dst = args[1].device, args[0].device
        if src is not None and src.type == "cpu" and dst.type == "cuda":
            source = args[0] if func is aten._to_copy.default else args[1]
            if not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
                self._log("blocking host-to-device copy")
            elif id(source) not in self._pinned:
                self._log("host-to-device copy from unpinned memory")
        if src is not None and src.type == "cuda" and dst.type == "cpu":
            self._log("device-to-host copy")
            with unset_fake_temporarily():
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten._pin_memory.default:  # (no fake kernel): the same fake, marked pinned
            self._pinned[id(args[0])] = args[0]
            return args[0]
        return func(*args, **kwargs)


def flags_sync(loss: torch.Tensor) -> dict:
    """TrainRun._sync, the step's one read of the device, on a stand-in for the run."""
    run = types.SimpleNamespace(
        _signal=None,
        _t_saved=0.0,
        _saved_periodic=True,
        args=types.SimpleNamespace(ckpt_minutes=15.0),
        schedule=LrSchedule(1.0, warmup=0, total=10),
    )
    return TrainRun._sync(run, loss)


def fake_grads(params) -> None:
    for p in params:
        p.grad = torch.randn_like(p)


# ---------------------------------------------------------------- one step of each method
def simclr_step(feed, state, dev):
    if "model" not in state:
        with torch.device(dev):
            model = simclr.SimCLR(build_backbone("resnet18", "cifar", 8), 16)
        state["model"] = model  # (channels_last, place_model's, cannot be applied to fakes)
        state["opt"] = simclr.LARS(simclr.param_groups(state["model"]), 1.0, 0.9, 1e-4, 1e-3)
        state["aug"] = BatchAugment(AugConfig(32), (0.5,) * 3, (0.25,) * 3)
    images = next(feed)
    loss = simclr.step_loss(state["model"], state["aug"], images, None, 0.5)
    yield loss
    fake_grads(state["model"].parameters())
    state["opt"].step()


def mae_args():
    args = apply_preset(mae.get_args_parser().parse_args(["--preset", "tiny"]), mae.PRESETS)
    args.image_size = args.crop_size = 32
    dim, depth, heads = mae.VIT_SIZES[args.backbone][1]
    args.decoder_dim, args.decoder_depth, args.decoder_heads = dim, depth, heads
    return args


def mae_step(feed, state, dev):
    if "model" not in state:
        args = state["args"] = mae_args()
        with torch.device(dev):
            state["model"] = mae.build_mae(args)
        groups = mae.param_groups(state["model"], 0.05)
        state["opt"] = torch.optim.AdamW(groups, lr=1e-3, fused=dev == "cuda")
        state["aug"] = BatchAugment(
            AugConfig(32, scale=(0.2, 1), jitter_p=0, gray_p=0), *[(0.5,) * 3] * 2
        )
    args, model = state["args"], state["model"]
    grid = model.encoder.grid
    n_keep = grid * grid - mae.num_masked(grid * grid, args.mask_ratio)
    images = next(feed)
    mask_gen = torch.Generator().manual_seed(0)  # the masks' CPU generator
    yield mae.step_loss(model, state["aug"], images, None, mask_gen, args, grid, n_keep)
    fake_grads(model.parameters())
    state["opt"].step()


def rotnet_step(feed, state, dev):
    if "model" not in state:
        with torch.device(dev):
            model = rotnet.RotNet(build_backbone("resnet18", "cifar", 8))
            state["mean_std"] = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
        state["model"] = model
        params = state["model"].parameters()
        state["opt"] = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    images = next(feed)
    loss, logits, y = rotnet.step_loss(state["model"], images, None, *state["mean_std"], 32, 4)
    yield loss, 100.0 * (logits.argmax(1) == y).float().mean()
    fake_grads(state["model"].parameters())
    state["opt"].step()


STEPS = {"simclr": simclr_step, "mae": mae_step, "rotnet": rotnet_step}


def run_steps(method: str, n_steps: int = 2) -> list[list[str]]:
    """n_steps fake-CUDA steps; the logged events of each (the first includes the set-up)."""
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast: "CUDA is not available, disabling"
        with FakeTensorMode(allow_non_fake_inputs=True), SyncLog() as log:
            data = torch.randint(0, 256, (4 * N, 32, 32, 3), dtype=torch.uint8)
            feed = BatchFeed(data, N, torch.device("cuda"), seed=0).epoch(0)
            state: dict = {}
            for _ in range(n_steps):
                log.events.clear()
                log.where.clear()
                step = STEPS[method](feed, state, "cuda")
                out = next(step)
                loss, metrics = (out[0], {"top1": out[1]}) if isinstance(out, tuple) else (out, {})
                assert loss.device.type == "cuda" and loss.shape == ()
                flags = (
                    flags_sync(loss) if not metrics else TrainRun._sync(_stand_in(), loss, metrics)
                )
                assert not flags["nonfinite"]
                next(step, None)  # the optimizer step on fake gradients
                per_step.append((list(log.events), list(log.where)))
    return per_step


def _stand_in():
    return types.SimpleNamespace(
        _signal=None,
        _t_saved=0.0,
        _saved_periodic=True,
        args=types.SimpleNamespace(ckpt_minutes=15.0),
        schedule=LrSchedule(1.0, warmup=0, total=10),
    )


@pytest.mark.parametrize("method", ["simclr", "mae", "rotnet"])
def test_one_host_sync_per_step_on_fake_cuda(method):
    (_, _), (events, where) = run_steps(method)
    # The second step is the steady state: the first also copies constants once.
    assert events == ["device-to-host copy"], where  # TrainRun's flags, nothing else


def test_the_log_sees_what_would_sync():
    """The check can fail: the old per-step habits are each caught."""
    with FakeTensorMode(allow_non_fake_inputs=True), SyncLog() as log:
        x = torch.rand(8, device="cuda")
        with pytest.raises(DynamicOutputShapeException):  # (a fake cannot know the size)
            torch.nonzero(x > 0.5)  # the old colour jitter's selection
        idx = torch.arange(8)
        _ = x[idx.to("cuda")]  # the old batch-index copy
        x.cpu()  # (.tolist() of a GPU tensor copies it so)
        bool(x.max() > 0.5)  # a Python branch on a device value
        _ = torch.tensor([0.5]).to("cuda", non_blocking=True)  # unpinned, so not asynchronous
    assert log.events == [
        "dynamic shape: nonzero",
        "blocking host-to-device copy",
        "device-to-host copy",
        "item",
        "host-to-device copy from unpinned memory",
    ], log.events


@pytest.mark.parametrize("method", ["simclr", "mae", "rotnet"])
def test_backward_has_no_sync_on_cpu(method):
    """The backward, which fake CUDA cannot run, logged on CPU tensors: no data-dependent op
    (the CPU's augmentation gathers images with nonzero, so only backward is logged)."""
    feed = BatchFeed(
        torch.randint(0, 256, (4 * N, 32, 32, 3), dtype=torch.uint8), N, torch.device("cpu"), 0
    )
    step = STEPS[method](feed.epoch(0), {}, "cpu")
    out = next(step)
    loss = out[0] if isinstance(out, tuple) else out
    with SyncLog() as log:
        loss.backward()
    assert log.events == [], log.events


def test_syncbatchnorm_syncs_as_docs_gpu_md_counts():
    """Multi-GPU runs use torch's SyncBatchNorm, whose forward drops empty ranks' statistics
    with three boolean-mask indexings (each a nonzero, so a host sync) per layer; its CUDA
    kernels have no fake implementation, so docs/gpu.md counts them from the source, and this
    test notices when torch changes it. The gpu preset's model has 23 BN layers: 69 syncs."""
    import inspect

    from torch.nn.modules._functions import SyncBatchNorm

    assert inspect.getsource(SyncBatchNorm.forward).count("[mask]") == 3
    args = apply_preset(simclr.get_args_parser().parse_args(["--preset", "gpu"]), simclr.PRESETS)
    model = simclr.SimCLR(build_backbone("resnet18", "cifar", 8), 16, args.proj_layers)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn == 23 and 3 * n_bn == 69
