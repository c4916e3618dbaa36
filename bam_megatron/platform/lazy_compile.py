"""``torch.compile`` decorators that import TorchDynamo on first call, not at import time.

megatron-core decorates its fused kernels (``megatron.core.jit.jit_fuser``, bias-GeLU/SwiGLU
fusions, ...) with ``torch.compile`` at import time. The decorator itself imports TorchDynamo
and Inductor (1-2 s of a tool's start, more on a busy machine), although ``torch.compile`` only
compiles on the first call anyway. Tools that never run those kernels (the checkpoint
converters) import megatron-core under `compile_on_first_call`: each ``torch.compile(fn)`` made
meanwhile becomes a wrapper that calls the real ``torch.compile`` the first time it runs, so
what is compiled, and when, is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch


def _deferred(compile_: Callable) -> Callable:
    def deferred_compile(model=None, **options):
        if model is None:  # @torch.compile(...) with options
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred_compile


@contextlib.contextmanager
def compile_on_first_call() -> Iterator[None]:
    """Within: ``torch.compile`` defers its work (TorchDynamo's import included) to the first call."""
    real = torch.compile
    torch.compile = _deferred(real)
    try:
        yield
    finally:
        torch.compile = real
