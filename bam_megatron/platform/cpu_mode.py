"""CPU mode: megatron-core's tensor, expert and pipeline parallelism on a machine without CUDA.

megatron-core is written for CUDA. With torch's CPU build and the gloo backend it runs unchanged once
the few CUDA-only spots below are covered. `enable()` covers them, only when CUDA is absent, and
`disable()` undoes every change (tests use both). This is the one place in the project that knows
about them; everything else is ordinary megatron-core code.

What each piece covers (megatron-core 0.16.1):

- ``torch.cuda.current_device / synchronize / Stream / Event / stream / current_stream``: called by
  ``utils.GlobalMemoryBuffer``, the MoE all-to-all token dispatcher (a device-to-host side stream),
  ``pipeline_parallel.p2p_communication``, ``tensor_parallel.layers`` (also in backward) and the DDP
  buffers. On CPU, streams and events are no-ops (every op is synchronous) and the "current device"
  is the CPU device itself.
- ``device="cuda"`` literals (``schedules.py`` token counters, ``clip_grads``, DDP buffers,
  ``.cuda()`` calls, all outside backward): a ``TorchFunctionMode`` rewrites CUDA devices to CPU. It also makes
  ``Tensor.type()`` report ``torch.cuda.FloatTensor`` for CPU tensors, which is what the optimizer,
  the distributed optimizer and ``clip_grads`` assert.
- ``tensor_parallel.random`` (``CudaRNGStatesTracker``, ``model_parallel_cuda_manual_seed``): the
  "CUDA generator" becomes the CPU default generator, so tracker ``fork()`` swaps the CPU state in
  and out exactly as it swaps the CUDA state on a GPU. Dropout is reproducible and differs per TP rank.
- ``moe_utils.te_general_gemm``: left undefined when Transformer Engine is missing (a NameError in
  the router GEMM); defined as ``None`` so the plain ``torch.mm`` path runs.
- ``token_dispatcher.maybe_move_tensor_to_cpu``: on a GPU it turns all-to-all split sizes into host
  numpy arrays; for CPU tensors it leaves them as tensors, which gloo's ``all_to_all_single``
  rejects. CPU mode converts them.
- ``jit_fuser`` (``torch.compile``): megatron-core's fused kernels are compiled for the GPU; on CPU
  they would invoke Inductor and a C++ compiler per function, so TorchDynamo is disabled and they
  run eagerly.

The sequence-parallel-capable norm is a module, not a patch: `bam_megatron.model.norm.TorchNorm`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

import torch
import torch._dynamo
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_CORE_VERSIONS = ("0.16.1",)

_active: "_CpuMode | None" = None


def is_active() -> bool:
    """Whether CPU mode is currently enabled in this process."""
    return _active is not None


def enable() -> bool:
    """Enable CPU mode if CUDA is absent; return whether it is active.

    Safe to call more than once. Never does anything on a machine with a usable GPU.
    """
    global _active
    if _active is not None:
        return True
    if torch.cuda.is_available():
        return False
    _check_megatron_core_version()
    mode = _CpuMode()
    mode.install()
    _active = mode
    return True


def disable() -> None:
    """Undo everything `enable` did (used by tests)."""
    global _active
    if _active is not None:
        _active.uninstall()
        _active = None


def _check_megatron_core_version() -> None:
    from megatron.core import __version__ as version

    if version not in TESTED_MEGATRON_CORE_VERSIONS:
        raise RuntimeError(
            f"bam_megatron CPU mode was tested with megatron-core "
            f"{', '.join(TESTED_MEGATRON_CORE_VERSIONS)}, but {version} is installed; "
            f"install megatron-core=={TESTED_MEGATRON_CORE_VERSIONS[-1]} or run on a GPU"
        )


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins: on CPU every op is synchronous, so streams and events have nothing to order.


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_NULL_STREAM = _NullStream()


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


_TORCH_CUDA_STANDINS: dict[str, Any] = {
    # Nearly every caller passes this straight on as ``device=``; returning the CPU device (not an
    # ordinal) keeps those calls right even inside backward, where TorchFunctionModes do not reach.
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda device=None: None,
    "Stream": _NullStream,
    "Event": _NullEvent,
    "current_stream": lambda device=None: _NULL_STREAM,
    "default_stream": lambda device=None: _NULL_STREAM,
    "stream": lambda stream=None: contextlib.nullcontext(),
    "set_stream": lambda stream: None,
    # The "CUDA generator" is the CPU default generator.
    "get_rng_state": lambda device="cuda": torch.get_rng_state(),
    "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
    "manual_seed": _cpu_manual_seed,
    "manual_seed_all": _cpu_manual_seed,
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device is a CUDA ordinal (bool is an int too, and never a device).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Runs CUDA-addressed tensor creation and moves on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizer and clip_grads assert param.type() == 'torch.cuda.FloatTensor'.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU twin of moe_utils.maybe_move_tensor_to_cpu: split sizes become numpy for gloo."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().numpy()
    return tensor


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


class _CpuMode:
    """The set of patches, recorded so that `uninstall` restores every original."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._function_mode = _CudaToCpuMode()
        self._dynamo_was_disabled = False
        self._fork_warning_filter = _DropForkWarning()

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name, _MISSING)))
        setattr(owner, name, value)

    def install(self) -> None:
        for name, standin in _TORCH_CUDA_STANDINS.items():
            self._patch(torch.cuda, name, standin)

        rng = importlib.import_module("megatron.core.tensor_parallel.random")
        self._patch(rng, "_get_cuda_rng_state", _cpu_get_rng_state)
        self._patch(rng, "_set_cuda_rng_state", _cpu_set_rng_state)
        logging.getLogger(rng.__name__).addFilter(self._fork_warning_filter)

        moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
        if not hasattr(moe_utils, "te_general_gemm"):
            self._patch(moe_utils, "te_general_gemm", None)
        dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
        self._patch(dispatcher, "maybe_move_tensor_to_cpu", _splits_to_host)

        self._dynamo_was_disabled = torch._dynamo.config.disable
        torch._dynamo.config.disable = True

        self._function_mode.__enter__()

    def uninstall(self) -> None:
        self._function_mode.__exit__(None, None, None)
        torch._dynamo.config.disable = self._dynamo_was_disabled
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(
            self._fork_warning_filter
        )
        for owner, name, original in reversed(self._saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()


_MISSING = object()

__all__: list[str] = ["enable", "disable", "is_active", "TESTED_MEGATRON_CORE_VERSIONS"]
