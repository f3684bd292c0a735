"""The multi-process test harness (conftest.run_ranks) cannot pass a failing rank: an error
or a crash on any rank fails the test quickly with that rank's message; results come back
by value, in rank order."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from ..conftest import run_ranks


def _sum_ranks(rank, world):
    t = torch.full((3,), float(rank))
    dist.all_reduce(t)
    return {"rank": rank, "sum": t}


def _rank1_raises(rank, world):
    if rank == 1:
        raise AssertionError("rank one disagrees")
    dist.barrier()          # rank 0 would wait here for the gloo timeout: the harness kills it


def _rank0_aborts(rank, world):
    dist.barrier()
    if rank == 0:
        os.abort()          # a crash with no Python error (like a C++ terminate at exit)
    dist.barrier()


def test_results_come_back_in_rank_order():
    results = run_ranks(_sum_ranks, 3)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(torch.equal(r["sum"], torch.full((3,), 3.0)) for r in results)


def test_a_failing_rank_fails_the_test_with_its_message():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="rank 1: AssertionError: rank one disagrees"):
        run_ranks(_rank1_raises, 2)
    assert time.monotonic() - start < 60      # not the 120 s gloo timeout


def test_a_crashed_rank_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match="rank 0 exited with code -6"):
        run_ranks(_rank0_aborts, 2)
