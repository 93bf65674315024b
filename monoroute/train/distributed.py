"""Data-parallel setup for runs launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the env)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group if there is one: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def comm_device(info: DistInfo) -> torch.device:
    """Where a collective's tensor must live: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def sum_across_ranks(values: list[float], info: DistInfo) -> list[float]:
    if info.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(info))
    dist.all_reduce(t)
    return t.tolist()


def mean_across_ranks(value: float, info: DistInfo) -> float:
    if info.world == 1:
        return value
    return sum_across_ranks([value], info)[0] / info.world


def any_across_ranks(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (so all ranks stop together)."""
    if info.world == 1:
        return flag
    return sum_across_ranks([1.0 if flag else 0.0], info)[0] > 0


def ranks_in_sync(model: torch.nn.Module, info: DistInfo) -> bool:
    """True if every rank holds the same weights (DDP must keep them identical)."""
    if info.world == 1:
        return True
    checksum = torch.tensor([sum(p.detach().double().sum().item() for p in model.parameters())], dtype=torch.float64,
                            device=comm_device(info))
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs().item() <= 1e-9 * max(1.0, checksum.abs().item()))


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
