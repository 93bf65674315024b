"""Early-dynamics readings of a router's search, recorded when the trainer or `eval` asks
(`router.diagnose = True`): how many units a batch proposes, how varied each token's sub-keys are."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def shared_ratio(q: Tensor) -> float:
    """(T, H, D) queries -> the norm of their mean over tokens over the root-mean-square distance from
    that mean, averaged over heads: 0 when the tokens share no component, > 1 when the shared part
    is larger than the per-token spread (then every token proposes nearly the same sub-keys)."""
    q = q.float()
    mean = q.mean(0)  # (H, D)
    spread = (q - mean).square().sum(-1).mean(0).sqrt()  # (H,)
    return (mean.norm(dim=-1) / spread.clamp(min=1e-12)).mean().item()


@torch.no_grad()
def search_diagnostics(proposed: Tensor, chosen: Tensor, n_units: int, n_sub: int | None = None) -> dict:
    """Early-dynamics readings of one batch's search: (T, P) proposed and (T, k) chosen unit ids ->
    `proposed_share` (units proposed to at least one token, over N), `chosen_share` (units selected at
    least once, over N) and, for product keys (units a·n_sub + b), `distinct_rows` (distinct sub-key
    rows a and columns b among a token's proposals, averaged over both halves and over tokens)."""
    def share(units: Tensor) -> float:
        seen = torch.zeros(n_units, dtype=torch.bool, device=units.device)
        seen[units.flatten()] = True
        return seen.float().mean().item()

    out = {"proposed_share": share(proposed), "chosen_share": share(chosen)}
    if n_sub is not None and proposed.numel():
        counts = [distinct_per_row(half, n_sub) for half in (proposed // n_sub, proposed % n_sub)]
        out["distinct_rows"] = (sum(counts) / 2).float().mean().item()
    return out


def distinct_per_row(values: Tensor, size: int | None = None) -> Tensor:
    """(T, P) -> (T,) the number of distinct values in each row. Given `size` (every value in [0, size)),
    by marking each row's values in a (T, size) table instead of sorting the rows: the trainer asks for
    this on its logging steps, where sorting (2,048, 256) ids twice per layer took ~45 ms of a
    cpu-small step."""
    if size is not None and values.numel():
        seen = torch.zeros(values.shape[0], size, dtype=torch.bool, device=values.device)
        return seen.scatter_(1, values, True).sum(-1)
    ordered = values.sort(dim=-1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(-1)
