"""Dataset index caches are written atomically (megatron-core writes them with a plain numpy.save)."""

import os

import numpy
import pytest
from megatron.core.datasets import gpt_dataset

from bam_megatron.data.atomic_cache import atomic_index_caches, atomic_save


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "index.npy"
    numpy.save(path, numpy.arange(3))

    def explode(file, array, allow_pickle=True):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(numpy, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(str(path), numpy.arange(10))
    monkeypatch.undo()
    assert numpy.load(path).tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["index.npy"]


def test_gpt_dataset_saves_go_through_atomic_save_inside_the_block(tmp_path):
    original = gpt_dataset.numpy
    with atomic_index_caches():
        assert gpt_dataset.numpy.save is atomic_save
        gpt_dataset.numpy.save(str(tmp_path / "x"), numpy.arange(4), allow_pickle=True)
        assert gpt_dataset.numpy.load is numpy.load  # everything else is numpy itself
    assert gpt_dataset.numpy is original
    assert numpy.load(tmp_path / "x.npy").tolist() == [0, 1, 2, 3]
