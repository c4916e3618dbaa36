"""What a checkpoint directory must hold, checked before megatron-core reads it, so that a damaged
file is named instead of surfacing as a PyTorch traceback from deep inside a load.

- At save time every rank records the size and CRC-32 of the files it wrote (``__RANK_*.distcp``;
  rank 0 also ``common.pt`` and the metadata files) into ``integrity.json`` beside them, before
  the checkpoint is published. The cost is one pass over the just-written files:
  a CRC-32 over a memory map of the (page-cached) bytes, several GB/s with ISA-L (`crc32`).
- `check_files` (every read of a checkpoint, cheap): each recorded file is present with its
  recorded size, the small files match their CRC, and every byte range ``.metadata`` points at
  lies inside its ``.distcp`` file: that last check needs no record, so a truncated shard of a
  checkpoint without one (older versions, Megatron-LM's) is named too.
- `check_checksums` (before a load reads the tensors): the CRC of every recorded file.
- `diagnose`: after a read failed anyway, the file at fault if the checks find it, else the
  checkpoint and the library's first line.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Optional

from bam_megatron.checkpoint.meta import CheckpointError

RECORD = "integrity.json"
_SMALL = 4 << 20  # files up to this size are CRC-checked on every read (common.pt, the metadata)
_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY
try:  # the same CRC-32 as zlib's, several times faster (PCLMULQDQ)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    _crc32 = zlib.crc32
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def crc32(path: str) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits.

    Over memory maps of the file (no copy out of the page cache), a window at a time (mapped pages
    count as the process's memory while mapped), with ISA-L's CRC-32 (the same checksum as zlib's,
    several times faster) when installed: checkpoints are checked at disk speed.
    """
    value = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - start), access=mmap.ACCESS_READ, offset=start) as window:
                window.madvise(mmap.MADV_SEQUENTIAL)
                value = _crc32(window, value)
    return f"{value:08x}"


def files_of_rank(directory: str, rank: int) -> list[str]:
    """The files of a just-written checkpoint that ``rank`` records: its own shards; rank 0 also the rest."""
    names = []
    for name in sorted(os.listdir(directory)):
        match = _RANK_FILE.match(name)
        if name == RECORD or not os.path.isfile(os.path.join(directory, name)):
            continue
        if (match and int(match.group(1)) == rank) or (match is None and rank == 0):
            names.append(name)
    return names


def describe(directory: str, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"size", "crc32"}} of the given files of ``directory``."""
    return {
        name: {"size": os.path.getsize(os.path.join(directory, name)), "crc32": crc32(os.path.join(directory, name))}
        for name in names
    }


def write_record(directory: str, entries: dict[str, dict]) -> None:
    """Write the integrity record (all ranks' entries, gathered on rank 0) into ``directory``, a
    checkpoint's temporary directory: its rename publishes the record with the rest."""
    with open(os.path.join(directory, RECORD), "w") as f:
        json.dump({"files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_record(path: str) -> Optional[dict[str, dict]]:
    """The recorded {name: {"size", "crc32"}} of checkpoint ``path``, or None if it has no record."""
    record = os.path.join(path, RECORD)
    if not os.path.isfile(record):
        return None
    try:
        with open(record) as f:
            return dict(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{record} is damaged: it is not the JSON record the save wrote") from None


def _extents(path: str) -> dict[str, int]:
    """{.distcp file: the end of the last byte range .metadata points at in it}."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as error:  # noqa: BLE001 - torch raises assorted errors on a damaged pickle
        raise CheckpointError(f"{os.path.join(path, '.metadata')} cannot be read ({_first_line(error)})") from None
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


def check_files(path: str) -> None:
    """Cheap checks of checkpoint ``path`` before reading it (see the module docstring); names the bad file."""
    record = read_record(path) or {}
    for name, entry in sorted(record.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (the checkpoint recorded it at save time)")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise CheckpointError(f"{file} is damaged: {size} bytes, {entry['size']} when it was saved")
        if size <= _SMALL and crc32(file) != entry["crc32"]:
            raise CheckpointError(f"{file} is corrupted: its CRC-32 differs from the one recorded at save time")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{os.path.join(path, '.metadata')} is missing")
    for name, end in sorted(_extents(path).items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (the checkpoint's .metadata points into it)")
        size = os.path.getsize(file)
        if size < end:
            raise CheckpointError(f"{file} is truncated: {size} bytes, the checkpoint's .metadata reads up to {end}")


def check_checksums(path: str, names: Optional[Sequence[str]] = None) -> None:
    """The CRC-32 of the recorded files ``names`` (all of them by default) against the record."""
    record = read_record(path)
    if record is None:
        return
    for name in sorted(record) if names is None else names:
        file = os.path.join(path, name)
        if name in record and crc32(file) != record[name]["crc32"]:
            raise CheckpointError(f"{file} is corrupted: its CRC-32 differs from the one recorded at save time")


def shards(path: str) -> list[str]:
    """The recorded files of checkpoint ``path`` too large for `check_files`' CRC (its tensor shards)."""
    record = read_record(path) or {}
    return sorted(name for name, entry in record.items() if entry["size"] > _SMALL)


# What a damaged file makes torch's readers raise (a bug raises something else, and keeps its traceback).
_READ_ERRORS = (EOFError, pickle.UnpicklingError, UnicodeDecodeError, zipfile.BadZipFile, OSError, struct.error)
_READ_MESSAGES = ("PytorchStreamReader", "zip archive", "unexpected EOF", "Invalid magic", "invalid load key")


def diagnose(path: str, error: BaseException, reading: Optional[str] = None) -> Optional[CheckpointError]:
    """The error to raise after reading checkpoint ``path`` failed with ``error``: the file at fault
    when the size and CRC checks find it; else, for an error a damaged file causes, the file being
    read (``reading``) or the checkpoint, with the library's first line; else None (not a damaged
    file: the caller re-raises)."""
    try:
        check_files(path)
        check_checksums(path)
    except CheckpointError as found:
        return found
    chain, current = [], error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, _READ_ERRORS) or any(m in str(e) for m in _READ_MESSAGES) for e in chain):
        if reading is not None:
            return CheckpointError(f"{reading} is damaged ({_first_line(error)})")
        return CheckpointError(f"checkpoint {path} cannot be read ({_first_line(error)})")
    return None


def _first_line(error: BaseException) -> str:
    """The error's type and first sentence (torch's messages go on for a paragraph)."""
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
