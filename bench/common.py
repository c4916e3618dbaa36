"""Shared benchmark plumbing: interleaved A/B timing and the JSON + one-line report."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


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


def init_single_rank(seed: int = 1234) -> None:
    """One in-process rank (gloo over a FileStore) with megatron-core's parallel state, CPU mode on."""
    import os
    import tempfile

    import torch.distributed as dist

    from bam_megatron.platform import distributed

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="bam-bench-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    distributed.initialize(distributed.ParallelSizes(), seed=seed)


def forward_backward(module, *inputs, **kwargs) -> None:
    """One forward and backward pass of a megatron-core module returning (output, bias)."""
    output = module(*inputs, **kwargs)
    output = output[0] if isinstance(output, tuple) else output
    output.float().sum().backward()
