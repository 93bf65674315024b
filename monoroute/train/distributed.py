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


class FiringSync:
    """Makes every rank's RoutedFFN firing statistics the global ones, once per optimizer step.

    Each rank records firings on its own tokens (DDP runs with broadcast_buffers=False, else rank 0's
    statistics would overwrite everyone's each forward and units would be judged on 1/world of the
    data). `__call__` merges what each rank recorded since the previous call: the global token clock
    advances by every rank's tokens; a unit that fired on any rank since then is stamped with the new
    global count (MAX over ranks); fire counts add up (SUM of the increments). Stamping a whole step
    with its end count is as exact as dead_window needs (one step is far below it). Two all-reduces
    of (N,) integers per routed layer per step: small next to the gradient all-reduce."""

    def __init__(self, layers: list, info: DistInfo) -> None:
        self.layers, self.info = layers, info
        self.mark()

    def mark(self) -> None:
        """Remember the (identical on every rank) statistics the next merge starts from."""
        self.base = [(layer.tokens_seen.clone(), layer.fire_count.clone()) for layer in self.layers]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.info.world == 1:
            return
        device = comm_device(self.info)
        for layer, (tokens0, count0) in zip(self.layers, self.base):
            increments = torch.cat([layer.fire_count - count0, (layer.tokens_seen - tokens0).view(1)]).to(device)
            dist.all_reduce(increments)  # SUM: every rank's new firings and tokens
            now = tokens0.to(device) + increments[-1]
            fired = layer.last_fired.to(device) > tokens0.to(device)  # fired here since the last merge
            last = torch.where(fired, now, layer.last_fired.to(device))
            dist.all_reduce(last, op=dist.ReduceOp.MAX)
            layer.fire_count.copy_(count0 + increments[:-1].to(count0.device))
            layer.tokens_seen.copy_(now)
            layer.last_fired.copy_(last)
        self.mark()


def ranks_in_sync(model: torch.nn.Module, info: DistInfo) -> bool:
    """True if every rank holds the same weights and buffers (DDP must keep the weights identical;
    FiringSync the routed layers' firing statistics)."""
    if info.world == 1:
        return True
    tensors = [*model.parameters(), *model.buffers()]
    checksum = torch.tensor([sum(t.detach().double().sum().item() for t in tensors)], dtype=torch.float64,
                            device=comm_device(info))
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool((high - low).abs().item() <= 1e-9 * max(1.0, checksum.abs().item()))


def finish(info: DistInfo) -> None:
    """Wait for every rank before the process group goes: a rank that tears its gloo pairs down while
    another is still finishing the last collective can abort that rank ("terminate called without an
    active exception", seen in the two-rank tests). Only on the normal path: after an error on one rank
    the others would wait here until the timeout."""
    if info.world > 1 and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
