"""The two-rank helper (tests/ranks.py) tolerates gloo's teardown abort only after every rank's work."""
import os
import time

import pytest
import torch.multiprocessing as mp

from ranks import done, spawn_ranks


def _abort_after(rank, path, mark):
    if mark:
        done(path, rank)
    if rank == 1:
        for _ in range(200):  # as the real workers' barrier: rank 0 has finished too (when it marks)
            if not mark or os.path.exists(os.path.join(path, "rank0.done")):
                break
            time.sleep(0.05)
        os.abort()  # SIGABRT, as gloo's "terminate called without an active exception"


def _fail(rank, path):
    done(path, rank)
    raise AssertionError("a check failed")


def test_an_abort_after_every_rank_finished_passes(tmp_path):
    spawn_ranks(_abort_after, (str(tmp_path), True), 2, str(tmp_path))


def test_an_abort_before_the_work_finished_fails(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        spawn_ranks(_abort_after, (str(tmp_path), False), 2, str(tmp_path))


def test_a_failed_check_fails_even_after_its_mark(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a check failed"):
        spawn_ranks(_fail, (str(tmp_path),), 2, str(tmp_path))
