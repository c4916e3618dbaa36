"""Which filesystem a path is on, and whether a failed write ran out of space there.

A full disk reaches Python in many forms: ``OSError(ENOSPC)`` from a plain write, and from
PyTorch's zip writer (which torch's checkpoint writers use) a ``RuntimeError`` such as
``[enforce fail at inline_container.cc:672] ... file write failed`` that never says why.
`out_of_space` recognises both, the second by the free space left where the write failed.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

# A write that failed with less than this free on its filesystem failed for want of space.
NEARLY_FULL_BYTES = 64 << 20


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def filesystem_of(path: str) -> str:
    """``DEVICE (mounted at MOUNTPOINT)`` for the filesystem holding ``path`` (or its nearest existing parent)."""
    target = os.path.realpath(_existing(path))
    best: Optional[tuple[str, str]] = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2:
                    continue
                device, mount = fields[0], fields[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[1])):
                    best = (device, mount)
    except OSError:
        pass
    return f"{best[0]} (mounted at {best[1]})" if best else target


def free_bytes(path: str) -> int:
    """Bytes an unprivileged write can still use on the filesystem of ``path``."""
    stats = os.statvfs(_existing(path))
    return stats.f_bavail * stats.f_frsize


def out_of_space(error: BaseException, path: str) -> bool:
    """Whether ``error``, raised while writing under ``path``, means its filesystem is full."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    try:
        return free_bytes(path) < NEARLY_FULL_BYTES
    except OSError:
        return False
