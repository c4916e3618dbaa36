"""Small file helpers shared by the data tools: input checks and the fsync-then-rename publishing step."""

from __future__ import annotations

import os

from bam_megatron.data.errors import DataError, MissingFileError


def require_file(path: str, what: str) -> None:
    """Raise a one-line ``MissingFileError``/``DataError`` unless ``path`` is a readable regular file."""
    if not os.path.exists(path):
        raise MissingFileError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{what} is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} is not readable: {path}")


def fsync_path(path: str) -> None:
    """Flush a file's contents (or, for a directory, its renames) to disk, so a crash cannot undo them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists (clean-up on an error path must not raise a second error)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
