"""Query centring for product-key routers (BatchNorm without affine, also across ranks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


QUERY_NORMS = ("none", "batch")


class QueryBatchNorm(nn.Module):
    """BatchNorm without affine parameters over the query channels: (T, D) -> (T, D), each channel
    centred and scaled by its statistics over the batch's tokens (PEER's query BatchNorm; XLM's
    product-key memory notes "batchnorm is best"). Running statistics (momentum 0.1, as nn.BatchNorm1d)
    serve eval. Under torch.distributed the batch statistics are summed over every rank (a
    differentiable all-reduce), so each rank normalises by the global batch and keeps the same running
    statistics, as SyncBatchNorm does; unlike SyncBatchNorm this also runs on CPU (gloo).
    Statistics are computed in float32 whatever the autocast dtype."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, q: Tensor) -> Tensor:
        q32 = q.to(torch.promote_types(q.dtype, torch.float32))
        if not self.training:
            return ((q32 - self.running_mean) * torch.rsqrt(self.running_var + self.eps)).to(q.dtype)
        count = q32.new_tensor(float(q32.shape[0]))
        total = torch.cat([q32.sum(0), count.view(1)])
        total = all_reduce_sum(total)
        n = total[-1]
        mean = total[:-1] / n
        centred = q32 - mean
        var = all_reduce_sum(centred.square().sum(0)) / n  # two passes: exact even when the mean dominates
        with torch.no_grad():
            unbiased = var * (n / (n - 1).clamp(min=1))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        return (centred * torch.rsqrt(var + self.eps)).to(q.dtype)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of t over every rank, differentiable (t itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)
    return t
