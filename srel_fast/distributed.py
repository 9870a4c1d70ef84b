"""torchrun / torch.distributed support shared by every stage.

A stage calls ``setup(device_name)`` once: under torchrun (``WORLD_SIZE`` > 1
in the environment) it joins the process group (NCCL with the local rank's
GPU on CUDA, gloo on the CPU) and returns the device this rank works on;
in a plain single process it does nothing and returns the usual device.
``cleanup()`` leaves a group that ``setup`` created. The rank and world size
always come from the torchrun environment variables, so a stage that never
talks to other ranks (recover) can shard its work without a process group.

Only rank 0 prints progress and writes shared files (``is_main``,
``main_print``); ``barrier()`` orders writes that other ranks depend on.
``SyncBN`` keeps BatchNorm statistics global on every device, so a DDP run
with a global batch B over W ranks computes what one process computes on B.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

_created_group = False


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world_size()


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """True when this process is one of several that talk to each other."""
    return is_initialized() and dist.get_world_size() > 1


def resolve_device(name: str) -> torch.device:
    """``auto``/``cuda`` under torchrun mean the local rank's GPU."""
    from .errors import UserError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but no CUDA device is available.")
        if dev.index is None and env_world_size() > 1:
            dev = torch.device("cuda", env_local_rank() % torch.cuda.device_count())
    return dev


def setup(device_name: str = "auto") -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; return this rank's device."""
    global _created_group
    device = resolve_device(device_name)
    if env_world_size() > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=60)}
        if backend == "nccl":
            kwargs["device_id"] = device
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
        _created_group = True
    return device


def cleanup() -> None:
    """Leave the process group if ``setup`` joined it."""
    global _created_group
    if _created_group and is_initialized():
        dist.destroy_process_group()
    _created_group = False


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def main_print(*args, **kwargs) -> None:
    if is_main():
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> list[float]:
    """Sum a list of numbers over ranks (float64); identity in one process."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def agree_or_raise(error: BaseException | None) -> None:
    """Collective error check: if any rank hit an error, every rank raises
    (the same message), so no rank is left waiting at the next collective."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
    for e in errors:
        if e is not None:
            if error is not None:
                raise error
            raise e[0](e[1])


def shard_bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that rank ``r`` of ``w`` owns (contiguous, sizes differ by at most 1)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return n * r // w, n * (r + 1) // w


# ----------------------------------------------------------------------------- BatchNorm across ranks


class _GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the global batch
    (all ranks) with a differentiable all-reduce of per-channel sums, so it works
    on any backend (gloo on the CPU too, where nn.SyncBatchNorm does not run).
    In eval mode it is a plain BatchNorm2d; its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        # Two passes (global mean, then global squared deviation) for a variance as
        # accurate as one process's; both all-reduces are differentiable.
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        s1 = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = s1[-1]
        mean = s1[:c] / n
        var = all_reduce(((xf - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch under DDP: nn.SyncBatchNorm on CUDA,
    the all-reduce BatchNorm2d above on the CPU. A no-op in one process."""
    if not is_distributed():
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_bn2d(model)


def _swap_bn2d(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = _GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats).to(module.weight.device if module.affine else "cpu")
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, _swap_bn2d(child))
    return module


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (with global BatchNorm); ``model`` itself in one process."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = convert_sync_batchnorm(model, device)
    if device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def stage(run):
    """Decorator for a stage entry point: join the group first, leave it after (also on errors)."""
    import functools

    @functools.wraps(run)
    def wrapper(cfg, *a, **k):
        setup(getattr(cfg, "device", "auto"))
        try:
            return run(cfg, *a, **k)
        finally:
            cleanup()

    return wrapper


__all__ = ["setup", "cleanup", "barrier", "rank", "world_size", "is_main", "is_distributed", "main_print",
           "all_reduce_sum", "broadcast_object", "agree_or_raise", "shard_bounds", "wrap_ddp", "unwrap",
           "convert_sync_batchnorm", "resolve_device", "env_rank", "env_world_size", "env_local_rank", "stage"]
