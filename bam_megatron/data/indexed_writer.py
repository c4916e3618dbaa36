"""Writing megatron-core indexed datasets so that a dataset is either complete or absent.

``IndexedDatasetBuilder`` writes ``PREFIX.bin`` as it goes and ``PREFIX.idx`` at the end; a crash
in between leaves files that look like a dataset. Here both are written under temporary names and
``publish`` renames them into place, every ``.idx`` last (the index is what makes a prefix a
dataset), after removing any old ``.idx`` so that an interrupted publish never pairs a new ``.bin``
with an old index.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

from bam_megatron.data.files import fsync_path, remove_quietly
from bam_megatron.platform import faults


def token_dtype(vocab_size: int) -> numpy.dtype:
    """The .bin token dtype megatron-core would pick for this vocabulary (uint16 when it fits, else int32)."""
    return numpy.dtype(DType.optimal_dtype(vocab_size))


class AtomicDatasetWriter:
    """An ``IndexedDatasetBuilder`` writing to temporary names; ``publish([...])`` makes the dataset visible.

    Args:
        prefix: the dataset path prefix (``PREFIX.bin`` / ``PREFIX.idx`` once published).
        dtype: the token dtype (see ``token_dtype``).
    """

    def __init__(self, prefix: str, dtype: numpy.dtype) -> None:
        self.prefix = prefix
        self.dtype = numpy.dtype(dtype)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # does not end in .bin/.idx: never mistaken for data
        self.bin_tmp = get_bin_path(prefix) + tag
        self.idx_tmp = get_idx_path(prefix) + tag
        self._builder = IndexedDatasetBuilder(self.bin_tmp, dtype=self.dtype.type)
        self.documents = 0
        self.tokens = 0

    def add_documents(self, tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        """Append documents given as their concatenated ids and per-document lengths (one sequence each)."""
        offset = 0
        for length in lengths.tolist():
            self._builder.add_document(tokens[offset : offset + length], [length])
            offset += length
        self.documents += len(lengths)
        self.tokens += offset

    def finalize(self) -> None:
        """Close the .bin, write the .idx (both still temporary) and flush both to disk."""
        self._builder.finalize(self.idx_tmp)
        fsync_path(self.bin_tmp)
        fsync_path(self.idx_tmp)

    def discard(self) -> None:
        """Remove the temporary files (error path); safe to call at any stage."""
        self._builder.data_file.close()
        remove_quietly(self.bin_tmp)
        remove_quietly(self.idx_tmp)


def publish(writers: Sequence[AtomicDatasetWriter]) -> None:
    """Rename finalized datasets into place: old indexes removed, then every .bin, then every .idx."""
    for writer in writers:
        remove_quietly(get_idx_path(writer.prefix))
    for writer in writers:
        os.replace(writer.bin_tmp, get_bin_path(writer.prefix))
    faults.reached("dataset-publishing")
    for writer in writers:
        os.replace(writer.idx_tmp, get_idx_path(writer.prefix))
    for directory in {os.path.dirname(os.path.abspath(w.prefix)) for w in writers}:
        fsync_path(directory)
