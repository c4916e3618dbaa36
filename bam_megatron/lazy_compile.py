"""``torch.compile`` decorators that import TorchDynamo on first call, not at import time.

megatron-core decorates its fused kernels (``megatron.core.jit.jit_fuser``, bias-GeLU/SwiGLU
fusions, ...) with ``torch.compile`` at import time. The decorator itself imports TorchDynamo
and Inductor (1-2 s of every process's start on a quiet machine, 5 s on a busy one), although
``torch.compile`` only compiles on the first call anyway. Within `compile_on_first_call`, each
``torch.compile(fn)`` becomes a wrapper that calls the real ``torch.compile`` the first time it
runs, so what is compiled, and when, is unchanged; while TorchDynamo is disabled (CPU mode) the
wrapper runs the function eagerly, as a compiled function does then. A process that never runs
those kernels, or runs them in CPU mode, never imports TorchDynamo.

`install` (called by ``bam_megatron/__init__.py``, so once in every process that imports this
package) puts a finder at the front of ``sys.meta_path`` that runs every ``megatron.core``
module's body under `compile_on_first_call`, whichever module imports megatron-core first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Optional

_PACKAGE = "megatron.core"
COMPILE_DISABLE_ENV = "TORCH_COMPILE_DISABLE"
"""The environment variable TorchDynamo's config reads when it is imported (``disable``)."""


def compile_disabled() -> bool:
    """Whether TorchDynamo is off in this process (``torch._dynamo.config.disable``, which reads
    TORCH_COMPILE_DISABLE when TorchDynamo is imported), told without importing it."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return bool(dynamo.config.disable)
    return os.environ.get(COMPILE_DISABLE_ENV) == "1"


def _deferred(compile_: Callable) -> Callable:
    def deferred_compile(model=None, **options):
        if model is None:  # @torch.compile(...) with options
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                if compile_disabled():  # what a compiled function does then: run eagerly
                    return model(*args, **kwargs)
                compiled = compile_(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred_compile


@contextlib.contextmanager
def compile_on_first_call() -> Iterator[None]:
    """Within: ``torch.compile`` defers its work (TorchDynamo's import included) to the first call."""
    import torch

    real = torch.compile
    torch.compile = _deferred(real)
    try:
        yield
    finally:
        torch.compile = real


class _DeferringLoader(importlib.abc.Loader):
    """A megatron-core module's own loader, whose module body runs under `compile_on_first_call`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # what inspect, importlib.resources and pickle read
        with compile_on_first_call():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _MegatronCoreFinder(importlib.abc.MetaPathFinder):
    """Finds megatron-core's modules as the other finders do, and wraps their loader."""

    def find_spec(self, fullname: str, path: Any, target: Optional[ModuleType] = None):
        if fullname != _PACKAGE and not fullname.startswith(_PACKAGE + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _DeferringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Defer megatron-core's ``torch.compile`` decorations in this process (idempotent)."""
    if not any(isinstance(finder, _MegatronCoreFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronCoreFinder())
