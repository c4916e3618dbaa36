"""Shared benchmark plumbing: interleaved A/B timing and the JSON + one-line report."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def interleaved_medians(a: Callable[[], None], b: Callable[[], None], rounds: int, warmup: int = 3):
    """Median seconds of ``a`` and of ``b``, alternating A, B, A, B... so machine noise hits both."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def report(result: dict, summary: str) -> None:
    """Print the JSON record, then the one-line summary."""
    print(json.dumps(result, indent=2, sort_keys=True))
    print(summary)
