"""The multi-rank harness itself: results in rank order, failures surfaced with their traceback."""

import os
import time

import pytest
import torch.distributed as dist

from bam_megatron.testing.distributed import DistributedTestError, run_distributed


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait forever for rank 1: the harness must not


def _die_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(3)
    return "ok"


def _sleep_forever():
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_world, 3) == [(0, 3), (1, 3), (2, 3)]


def test_a_failing_rank_surfaces_its_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    message = str(info.value)
    assert "rank 1 traceback" in message and "ValueError: boom on purpose" in message


def test_a_dead_rank_is_reported_with_its_exit_code():
    with pytest.raises(DistributedTestError, match="rank 1 exited with code 3"):
        run_distributed(_die_on_rank_one, 2, timeout=60)


def test_a_hung_rank_times_out():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="did not finish within 3 s"):
        run_distributed(_sleep_forever, 2, timeout=3)
    assert time.monotonic() - start < 30
