"""megatron-core dist_checkpointing on CPU: saved under one parallel layout, loaded under another."""

import os

import pytest
import torch

from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble, local_shards
from tests.support.tiny_gpt import build

pytestmark = pytest.mark.megatron_core  # stock megatron-core on CPU (tests/conftest.py)


def save_checkpoint(sizes: ParallelSizes, model: str, directory: str):
    from megatron.core import dist_checkpointing

    _, ddp = build(sizes, model)
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(ddp.module.sharded_state_dict(), directory)
    return local_shards(ddp.module)


def load_checkpoint(sizes: ParallelSizes, model: str, directory: str):
    from megatron.core import dist_checkpointing

    _, ddp = build(sizes, model)
    model = ddp.module
    with torch.no_grad():  # make sure every value really comes from the checkpoint
        for param in model.parameters():
            param.fill_(float("nan"))
    state = dist_checkpointing.load(model.sharded_state_dict(), directory)
    model.load_state_dict(state)
    return local_shards(model)


@pytest.mark.parametrize(
    "model,saved_as,loaded_as",
    [  # (layout, world size)
        ("gpt", (ParallelSizes(tensor=2), 2), (ParallelSizes(), 1)),
        ("gpt", (ParallelSizes(), 1), (ParallelSizes(tensor=2), 2)),
        ("gpt-moe", (ParallelSizes(expert=2), 2), (ParallelSizes(), 1)),
        ("gpt-moe", (ParallelSizes(pipeline=2), 2), (ParallelSizes(tensor=2, sequence_parallel=True), 2)),
    ],
    ids=["dense-tp2-to-tp1", "dense-tp1-to-tp2", "moe-ep2-to-ep1", "moe-pp2-to-tp2"],
)
def test_resharding_round_trips_exactly(tmp_path, model, saved_as, loaded_as):
    ckpt = str(tmp_path / "ckpt")
    (save_sizes, save_world), (load_sizes, load_world) = saved_as, loaded_as
    saved = assemble(run_distributed(save_checkpoint, save_world, args=(save_sizes, model, ckpt)))
    loaded = assemble(run_distributed(load_checkpoint, load_world, args=(load_sizes, model, ckpt)))
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
