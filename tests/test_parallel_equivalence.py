"""megatron-core on CPU (2 gloo ranks): TP, SP, EP and PP give one rank's loss and gradients.

The one-rank run produces the reference weights; every parallel run loads exactly those weights
through megatron-core's own sharding declarations and must reproduce loss and gradients.
"""

import pytest
import torch

from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble
from tests.tiny_gpt import gradient_step

MICRO_BATCHES = 4  # several, so the 1F1B pipeline schedule has a steady state


def _reference(moe: bool) -> dict:
    (serial,) = run_distributed(gradient_step, 1, args=(ParallelSizes(), moe, None, MICRO_BATCHES))
    return {
        "loss": serial["loss"],
        "weights": assemble([serial["weights"]]),
        "grads": assemble([serial["grads"]]),
    }


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(moe: bool) -> dict:
        if moe not in cache:
            cache[moe] = _reference(moe)
        return cache[moe]

    return get


def assert_matches_reference(ref: dict, results: list[dict]) -> None:
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(ref["loss"], rel=1e-6)
    grads = assemble([r["grads"] for r in results])
    assert grads.keys() == ref["grads"].keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "moe,sizes",
    [
        (False, ParallelSizes(tensor=2)),
        (False, ParallelSizes(tensor=2, sequence_parallel=True)),
        (False, ParallelSizes(pipeline=2)),
        (True, ParallelSizes(tensor=2, sequence_parallel=True)),
        (True, ParallelSizes(expert=2)),
        (True, ParallelSizes(pipeline=2)),
    ],
    ids=["dense-tp2", "dense-tp2-sp", "dense-pp2", "moe-tp2-sp", "moe-ep2", "moe-pp2"],
)
def test_parallel_matches_one_rank(reference, moe, sizes):
    ref = reference(moe)
    results = run_distributed(gradient_step, 2, args=(sizes, moe, ref["weights"], MICRO_BATCHES))
    assert_matches_reference(ref, results)


@pytest.mark.parametrize(
    "moe,sizes",
    [(False, ParallelSizes(tensor=2)), (True, ParallelSizes(expert=2))],
    ids=["tp2", "ep2"],
)
def test_a_wrong_shard_is_detected(reference, moe, sizes):
    """Negative control: perturb rank 1's shard of one weight and the comparison must fail."""
    ref = reference(moe)
    results = run_distributed(
        gradient_step, 2, args=(sizes, moe, ref["weights"], MICRO_BATCHES, 1)
    )
    with pytest.raises(AssertionError):
        assert_matches_reference(ref, results)
