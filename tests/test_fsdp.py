"""FSDP2 with column-sharded unit tables: 2 CPU processes on gloo match the unsharded model."""
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN
from monoroute.train.fsdp import shard_memory_table, shard_model
from monoroute.train.optim import build_optimizer, clip_grad_norm_
from ranks import done, spawn_ranks

D, N, K, T, WORLD = 8, 16, 4, 6, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.ffn = RoutedFFN(D, N, K, aux_coef=0.0)

    def forward(self, x):
        return x + self.ffn(self.ln(x))


class StandIn(nn.Module):
    """The shape of a GPT as shard_model sees it: `blocks` plus parameters at the root."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def make_model():
    torch.manual_seed(0)
    return StandIn()


def inputs(rank):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        reference = make_model()
        sharded = shard_model(make_model())
        w_in = sharded.blocks[0].ffn.w_in
        assert w_in.placements[0].dim == 1 and w_in.to_local().shape == (N, D // WORLD)
        assert sharded.inp.weight.placements[0].dim == 0

        # Sharded: each rank its own batch; FSDP2 averages gradients over ranks.
        out = sharded(inputs(rank))
        out.pow(2).sum().backward()
        ref_out = reference(inputs(rank))
        torch.testing.assert_close(out, ref_out)
        ref_loss = sum(reference(inputs(r)).pow(2).sum() for r in range(WORLD)) / WORLD
        ref_loss.backward()
        for (name, p), ref_p in zip(sharded.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), ref_p.grad, msg=name)

        norm = clip_grad_norm_(sharded.parameters(), 0.5)
        torch.testing.assert_close(norm, clip_grad_norm_(reference.parameters(), 0.5))

        # One optimizer step, with the unit tables in RowSparseAdamW on their local column shards.
        opt = build_optimizer(sharded, lr=1e-2, weight_decay=0.1, sparse_rows=True)
        ref_opt = build_optimizer(reference, lr=1e-2, weight_decay=0.1, sparse_rows=True)
        opt.step()
        ref_opt.step()
        for (name, p), ref_p in zip(sharded.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), ref_p, msg=name)
        done(path, rank)  # every check passed (tests/ranks.py)
        dist.barrier()  # neither rank tears its gloo pairs down while the other may still be in the last all-gather
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_fsdp2_column_sharded_matches_unsharded(tmp_path):
    spawn_ranks(_worker, (free_port(), str(tmp_path)), WORLD, str(tmp_path))


def test_shard_model_rejects_indivisible_d():
    model = nn.Sequential(RoutedFFN(6, 16, 4))
    with pytest.raises(MonorouteError, match="divisible"):
        shard_model(model, mesh=_FakeMesh(4))


def test_shard_model_rejects_sparse_grad():
    model = nn.Sequential(RoutedFFN(8, 16, 4, sparse_grad=True))
    with pytest.raises(MonorouteError, match="sparse gradients"):
        shard_model(model, mesh=_FakeMesh(2))


class _FakeMesh:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_shard_memory_table_divides_state_by_world():
    rows = {(r["n_units"], r["d_model"], r["world"]): r for r in shard_memory_table()}
    one, eight = rows[(262_144, 768, 1)], rows[(262_144, 768, 8)]
    assert one["state_bytes_per_rank"] == 16 * (2 * 262_144 * 768 + 262_144)
    assert eight["state_bytes_per_rank"] == one["state_bytes_per_rank"] // 8
    assert one["transient_bytes"] == 0
