"""Two-rank gloo tests: spawn the ranks, tolerate only gloo's own teardown abort.

A spawned rank very rarely dies with SIGABRT ("terminate called without an active exception") while
its gloo process group is torn down, after all its work and checks are done (seen about once in ten
runs of the query-BatchNorm test, also with a barrier before the teardown). Each worker calls
`done(path, rank)` as the last act of its real work, before the barrier and the teardown; `spawn_ranks`
accepts a SIGABRT exit only when every rank has written that mark, so any failure before it (an
assertion, a crash in the work itself, a missing rank) still fails the test."""
from __future__ import annotations

import os

import torch.multiprocessing as mp


def done(path: str, rank: int) -> None:
    with open(os.path.join(path, f"rank{rank}.done"), "w") as f:
        f.write("ok")


def spawn_ranks(worker, args: tuple, nprocs: int, path: str) -> None:
    """mp.spawn(worker, args, nprocs); `path` is where the workers write their done marks (an arg of theirs)."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        marked = all(os.path.exists(os.path.join(path, f"rank{r}.done")) for r in range(nprocs))
        if error.signal_name != "SIGABRT" or not marked:
            raise
