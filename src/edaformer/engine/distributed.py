"""``torch.distributed`` helpers: set-up from the ``torchrun`` environment and small collectives.

Everything here also works in a plain single process (no process group): rank 0 of 1.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..utils import resolve_device

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "is_distributed", "get_rank",
           "get_world_size", "is_main_process", "barrier", "all_reduce_mean", "broadcast_object",
           "all_gather_object", "convert_sync_batchnorm", "GlooSyncBatchNorm", "on_main"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its rank among ``world_size``, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    device = resolve_device(device)
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800) -> DistInfo:
    """Join the process group described by ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); NCCL on CUDA, Gloo on CPU.

    Without those variables (or with ``WORLD_SIZE=1``) no group is created.
    ``device`` is ``cpu``, ``cuda`` (this process takes GPU ``LOCAL_RANK``) or None (CUDA if available).
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a detached copy; the input itself unless distributed)."""
    value = value.detach()
    if not is_distributed() or get_world_size() == 1:
        return value
    out = value.to(_collective_device(), dtype=torch.float64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / get_world_size()).to(value.device, value.dtype)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """The list of every rank's ``obj``, in rank order."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks, for CPU tensors (Gloo).

    ``nn.SyncBatchNorm`` only runs on accelerators; this module computes the global mean and
    (biased) variance with two differentiable all-reduces and updates the running statistics
    like ``BatchNorm2d`` (unbiased variance over the global batch). Outside training, or without
    a process group, it is a plain ``BatchNorm2d``; its state dict is the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype)
        count = _AllReduceSum.apply(count)
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centered = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centered.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a synchronized one: ``nn.SyncBatchNorm`` on CUDA,
    :class:`GlooSyncBatchNorm` on the CPU. Parameters and buffers are kept (same state dict)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


def on_main(info: DistInfo, fn, *args) -> Any:
    """``fn(*args)`` on rank 0 (None elsewhere); an error there is raised on every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn(*args)
        except (ValueError, OSError) as e:
            error = e
    status = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if status is not None:
        raise RuntimeError(f"rank 0 stopped: {status}")
    return result
