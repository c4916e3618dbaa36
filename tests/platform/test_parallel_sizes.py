"""ParallelSizes.validate: layouts that cannot tile the world fail with a message naming the flag."""

import pytest

from bam_megatron.errors import ConfigError
from bam_megatron.platform.distributed import ParallelSizes


@pytest.mark.parametrize(
    "sizes,world,message",
    [
        (ParallelSizes(tensor=2), 3, "world size 3 is not divisible by --tensor-model-parallel-size (2)"),
        (ParallelSizes(pipeline=2, tensor=2), 6, "--pipeline-model-parallel-size (2)"),
        (ParallelSizes(tensor=2, expert=2), 2, "--expert-model-parallel-size 2 x --tensor-model-parallel-size 2"),
        (ParallelSizes(expert=3), 4, "must divide the 4 ranks of a pipeline stage"),
        (ParallelSizes(sequence_parallel=True), 2, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (ParallelSizes(tensor=0), 2, "--tensor-model-parallel-size must be >= 1"),
    ],
)
def test_invalid_layouts(sizes, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sizes.validate(world)


@pytest.mark.parametrize(
    "sizes,world",
    [(ParallelSizes(tensor=2, expert=2), 4), (ParallelSizes(pipeline=2, expert=2), 4), (ParallelSizes(expert=2), 2)],
)
def test_valid_layouts(sizes, world):
    sizes.validate(world)
