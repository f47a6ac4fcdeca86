"""Process-group set-up for the three ways `train.py` is launched.

    python train.py ...                         one process (no process group)
    torchrun --nproc_per_node N train.py ...    DDP (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*)
    deepspeed train.py --ds_config f.json ...   DeepSpeed (its launcher sets the same variables, adds --local_rank)

NCCL on GPUs, gloo on CPU (the CI machines). `python train.py --ds_config ...` also works: a 1-process group is
created with a free local port, which DeepSpeed needs (it would otherwise try MPI discovery).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str          # "single" | "ddp" | "deepspeed"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("run.device=cuda was asked for but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device_preference: str = "auto", use_deepspeed: bool = False,
                      local_rank_arg: int | None = None) -> DistInfo:
    """Initialize the process group the launcher asked for (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"

    if use_deepspeed:
        import deepspeed

        if "MASTER_ADDR" not in os.environ:  # plain `python train.py --ds_config ...`: a 1-process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, "deepspeed")
    if world_size > 1:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, "ddp")
    return DistInfo(0, 0, 1, device, "single")


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (a copy; identity in one process): 'any rank' for 0/1 flags."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
