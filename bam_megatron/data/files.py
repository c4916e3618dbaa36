"""Small file helpers shared by the data tools: input checks and the fsync-then-rename publishing step."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

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


@contextlib.contextmanager
def output_directory(path: str) -> Iterator[None]:
    """Create directory ``path`` (and missing parents) for the outputs of a block; if the block fails,
    remove again those it created that are still empty, so that a failed run leaves no empty directory."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"output directory {path} is a file")
    if not os.path.isdir(probe):
        raise DataError(f"cannot create output directory {path}: {probe} is a file")
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty
        raise


def remove_stale_temporaries(directory: str, prefix: str) -> None:
    """Remove ``prefix*.tmp-PID[-*]`` files and directories in ``directory`` left by killed runs (PID gone)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if not name.startswith(prefix) or ".tmp-" not in name[len(prefix) :]:
            continue
        pid = name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_quietly(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
