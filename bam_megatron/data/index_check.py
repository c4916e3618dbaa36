"""An indexed dataset's ``.idx`` read and checked over all its entries before megatron-core touches it.

megatron-core's ``IndexedDataset`` trusts its index: a sequence pointer past the end of the ``.bin``
file, a negative length or document boundaries out of order surface later as a crash (or as wrong
samples) deep inside the sample-index builder, and an index that fails to load leaves its
half-built reader's ``__del__`` complaining on stderr. Here the index is parsed with numpy (the
format of megatron-core's ``_IndexWriter``), every entry is checked with vectorised comparisons,
and the first inconsistency becomes one `DataError` naming the file and the entry.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy
from megatron.core.datasets.indexed_dataset import DType, get_bin_path, get_idx_path

from bam_megatron.data.errors import DataError
from bam_megatron.platform import internals

_COUNTS = 8 + 1 + 8 + 8  # after the header: version, dtype code, sequence and document counts


@dataclass(frozen=True)
class IndexArrays:
    """What a checked ``.idx`` holds: token dtype, per-sequence lengths and byte pointers, document starts."""

    dtype: type
    lengths: numpy.ndarray
    pointers: numpy.ndarray
    document_indices: numpy.ndarray

    @property
    def tokens(self) -> int:
        """Tokens the ``.bin`` file holds according to the index."""
        return int(self.lengths.sum())


def _first_bad(mask: numpy.ndarray) -> int:
    return int(numpy.flatnonzero(mask)[0])


def read_checked_index(prefix: str) -> IndexArrays:
    """PREFIX.idx parsed and checked against itself and PREFIX.bin; a `DataError` names the first fault."""
    idx, bin_ = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DataError(f"dataset file not found: {path} (from --data-path {prefix})")
    size = os.path.getsize(idx)
    header = internals.indexed_dataset_header()
    with open(idx, "rb") as f:
        preamble = f.read(len(header) + _COUNTS)
    if len(preamble) < len(header) + _COUNTS or preamble[: len(header)] != header:
        raise DataError(f"dataset index {idx} is not a megatron-core index (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", preamble[len(header) :])
    start = len(preamble)  # the arrays follow the preamble
    if version != 1:
        raise DataError(f"dataset index {idx}: version {version}, megatron-core reads version 1")
    try:
        dtype = DType.dtype_from_code(code)
    except (KeyError, ValueError):
        raise DataError(f"dataset index {idx}: unknown token dtype code {code}") from None
    needed = start + sequences * (4 + 8) + documents * 8
    if size < needed:
        raise DataError(
            f"dataset index {idx} is truncated: {size} bytes, its {sequences} sequences and "
            f"{documents} document boundaries need {needed}"
        )
    buffer = numpy.memmap(idx, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(buffer, numpy.int32, sequences, start)
    pointers = numpy.frombuffer(buffer, numpy.int64, sequences, start + 4 * sequences)
    document_indices = numpy.frombuffer(buffer, numpy.int64, documents, start + 12 * sequences)
    index = IndexArrays(dtype, lengths, pointers, document_indices)
    _check_consistent(index, prefix, idx, bin_)
    return index


def _check_consistent(index: IndexArrays, prefix: str, idx: str, bin_: str) -> None:
    """Lengths, pointers and document boundaries agree with each other and with the .bin file's size."""
    lengths, pointers, docs = index.lengths, index.pointers, index.document_indices
    if len(lengths) == 0:
        raise DataError(f"dataset {prefix} holds no sequences")
    if (lengths < 0).any():
        i = _first_bad(lengths < 0)
        raise DataError(f"dataset index {idx}: sequence {i} has a negative length ({int(lengths[i])})")
    item = numpy.dtype(index.dtype).itemsize
    expected = numpy.concatenate(([0], numpy.cumsum(lengths[:-1].astype(numpy.int64) * item)))
    if (pointers != expected).any():
        i = _first_bad(pointers != expected)
        raise DataError(
            f"dataset index {idx} is inconsistent: sequence {i} starts at byte {int(pointers[i])}, "
            f"the lengths before it put it at {int(expected[i])}"
        )
    end = int(pointers[-1]) + int(lengths[-1]) * item
    actual = os.path.getsize(bin_)
    if actual < end:
        raise DataError(f"dataset file {bin_} is truncated: {actual} bytes, its index expects {end}")
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != len(lengths) or (numpy.diff(docs) < 0).any():
        raise DataError(
            f"dataset index {idx} is inconsistent: its {len(docs)} document boundaries do not run from 0 "
            f"to its {len(lengths)} sequences in order"
        )
