"""Process groups of one tensor-parallel group: device collectives (NCCL or gloo) plus a gloo group for host data."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class TPState:
    """This rank's place in the tensor-parallel group. `group` carries device tensors (NCCL on CUDA, gloo on
    CPU); `cpu_group` (always gloo) carries the scheduler's per-step host data and adapter loads."""

    rank: int
    world_size: int
    device: torch.device
    group: object = None
    cpu_group: object = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension (equal shapes on every rank)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None):
        """Rank 0 sends `obj` (any picklable host object) to every rank; returns it on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]


def init_tensor_parallel(rank: int, world_size: int, device: torch.device | str, init_method: str,
                         timeout_s: float = 600.0, cmd_timeout_s: float | None = None) -> TPState:
    """Join the group (NCCL when `device` is CUDA, else gloo) and create the gloo host group beside it.
    cmd_timeout_s: give the host (command) group its own timeout (a server's workers wait idle for commands)."""
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kw)
    if cmd_timeout_s is not None:
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cmd_timeout_s))
    else:
        cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    os.environ.setdefault("LORAMUX_TP_RANK", str(rank))
    return TPState(rank, world_size, device, dist.group.WORLD, cpu_group)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
