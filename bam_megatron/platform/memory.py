"""Process memory behaviour for tools that stream large tensors through a bounded working set."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_tensors_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with their own mmap, so freeing returns them.

    glibc raises its mmap threshold after each large free (up to 32 MB), after which
    layer-sized tensors come from the heap and the heap only grows: a converter that streams
    one layer at a time would still see its resident memory climb layer after layer. Setting
    the threshold explicitly turns that adjustment off. Returns False where it is unavailable
    (not glibc).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
