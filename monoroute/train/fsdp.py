"""FSDP2 (`fully_shard`) for routed models, with the unit tables sharded column-wise over d.

How the tables shard. A RoutedFFN's w_in/w_out are (N, d) tables. FSDP2's default placement,
Shard(0), would give each rank a contiguous range of N/world rows; we use Shard(1) instead (as
Meta's memory layers shard their value tables): each rank keeps ALL N rows, d/world columns each.
Then every unit id is valid on every rank, so row-wise operations stay rank-local: the touched-row
update of `RowSparseAdamW` (given each rank's local shard) and the row gathers of an embedding-bag
style compute need no routing of ids between ranks. d must be divisible by the world size.

What FSDP2 saves, and what it does not: between uses a table costs 1/world of its parameters,
gradients and Adam moments per rank (16 bytes/element in fp32 -> 16/world). For the duration of
one block's forward (and again in its backward) FSDP2 all-gathers that block's full tables, so the
transient peak is one layer's unsharded tables (plus their unsharded gradient before the
reduce-scatter). Keeping even that off one device needs tensor-parallel compute on the column
shards (each rank computes its d/world slice of every token's output), which is not built here.
Sparse (COO) gradients are not supported by FSDP2 (torch 2.13: its post-backward reduce-scatter
copy calls aten::as_strided, which has no sparse kernel), so `shard_model` refuses
RoutedFFN(sparse_grad=True); RowSparseAdamW still skips the untouched rows of the dense
gradient. `shard_memory_table` computes the per-rank bytes for a grid of sizes.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN

COLUMN_SHARDED = ("w_in", "w_out", "w_gate")


def shard_model(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Apply FSDP2 to each of `model.blocks` (else each RoutedFFN) and then to the root.

    Needs an initialised default process group (torchrun, or init_process_group). Returns the
    same module, now an FSDPModule whose parameters are DTensors.
    """
    world = mesh.size() if mesh is not None else _world_size()
    routed = [m for m in model.modules() if isinstance(m, RoutedFFN)]
    for layer in routed:
        if layer.d_model % world:
            raise MonorouteError(
                f"column sharding needs d_model divisible by the world size, got d_model={layer.d_model}, "
                f"world={world}; pick a world size that divides d_model"
            )
        if getattr(layer, "sparse_grad", False):
            raise MonorouteError("FSDP2 cannot reduce-scatter sparse gradients; build the model with sparse_grad=False")
    columns = {id(getattr(layer, name)) for layer in routed for name in COLUMN_SHARDED}

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in columns else None  # None: FSDP2's default Shard(0)

    units = list(model.blocks) if hasattr(model, "blocks") else routed
    for unit in units:
        fully_shard(unit, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def _world_size() -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise MonorouteError("shard_model needs torch.distributed initialised; launch with torchrun")
    return dist.get_world_size()


def shard_memory_table(
    n_units=(32_761, 262_144, 1_048_576), d_models=(768, 2048), worlds=(1, 8, 64), bytes_per_elem: int = 4
) -> list[dict]:
    """Bytes per rank for ONE RoutedFFN's unit tables (w_in, w_out, b_in) under column sharding.

    state: parameters + gradients + Adam's two moments, sharded (4 copies / world).
    transient: what FSDP2 adds while the layer runs: the unsharded parameters and gradient
    (2 copies) less the rank's own shard of each.
    """
    rows = []
    for n in n_units:
        for d in d_models:
            elements = 2 * n * d + n  # w_in, w_out, b_in
            for world in worlds:
                rows.append(dict(
                    n_units=n, d_model=d, world=world,
                    state_bytes_per_rank=4 * elements * bytes_per_elem // world,
                    transient_bytes=2 * elements * bytes_per_elem * (world - 1) // world,
                ))
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """The table as Markdown, in GiB."""
    gib = 2**30
    lines = ["| N | d | world | params+grads+Adam per rank (GiB) | + transient while the layer runs (GiB) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n_units']:,} | {r['d_model']} | {r['world']} | {r['state_bytes_per_rank'] / gib:.3f} "
                     f"| {r['transient_bytes'] / gib:.3f} |")
    return "\n".join(lines)
