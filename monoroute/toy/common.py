"""Pieces every toy experiment shares: seeding and the Adam loop."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn



def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def fit(model: nn.Module, loss_fn: Callable[[], Tensor], steps: int, lr: float) -> float:
    """Adam on `loss_fn()` (which samples its own batch) for `steps` steps; returns the last loss.

    The learning rate decays linearly to 10 % over the last half: the toy optima are sharp
    (antipodal pairs, monosemantic units), and a constant rate leaves them visibly noisy.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    half = steps // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < half else 1.0 - 0.9 * (s - half) / max(steps - half, 1)
    )
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()
