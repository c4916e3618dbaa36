"""Atomic writes of megatron-core's dataset index caches.

GPTDataset saves its document/sample/shuffle indices with a plain ``numpy.save`` and later trusts
any cache file that exists, so a run killed mid-write leaves a truncated cache that breaks every
later run. Inside `atomic_index_caches()` those saves go to a temporary file in the same directory
and are renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Iterator
from typing import Any

import numpy
from megatron.core.datasets import gpt_dataset


def atomic_save(path: Any, array: Any, allow_pickle: bool = True) -> None:
    """numpy.save that leaves either the old file or the complete new one, never a partial one."""
    path = os.fspath(path)
    if not path.endswith(".npy"):
        path += ".npy"
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.save(f, array, allow_pickle=allow_pickle)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_index_caches() -> Iterator[None]:
    """Make gpt_dataset's numpy.save atomic for the duration of the block."""
    view = types.ModuleType("numpy")
    view.__dict__.update(vars(numpy))
    view.save = atomic_save
    original = gpt_dataset.numpy
    gpt_dataset.numpy = view
    try:
        yield
    finally:
        gpt_dataset.numpy = original
