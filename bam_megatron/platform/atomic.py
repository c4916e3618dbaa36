"""Small files that are either the old version or the complete new one, never half written."""

from __future__ import annotations

import contextlib
import os
from typing import Union


def write_atomically(path: str, data: Union[bytes, str]) -> None:
    """Write ``path`` under a temporary name in the same directory, fsync, rename into place.

    On failure (a full disk) the temporary file is removed and ``path`` is as it was.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
