"""CPU mode: megatron-core's tensor, expert and pipeline parallelism on a machine without CUDA.

megatron-core is written for CUDA. With torch's CPU build and the gloo backend it runs unchanged once
the few CUDA-only spots below are covered. `enable()` covers them, only when CUDA is absent, and
`disable()` undoes every change (tests use both). This is the one place in the project that knows
about them; everything else is ordinary megatron-core code. Nothing here sits on the per-op path of
a forward or backward pass (see bench/cpu_mode_overhead.py).

What each piece covers (megatron-core 0.16.1):

- ``torch.cuda.current_device / synchronize / Stream / Event / stream / current_stream`` and
  ``Tensor.cuda()``: called by ``utils.GlobalMemoryBuffer``, ``tensor_parallel.layers`` (in backward
  too), the MoE all-to-all dispatcher (a device-to-host side stream), ``p2p_communication``, the DDP
  buffers and ``LanguageModule`` (tied embeddings). On CPU every op is synchronous, so streams and
  events are no-ops; the "current device" is the CPU device and ``.cuda()`` leaves a tensor where it is.
- ``device="cuda"`` literals in ``transformer.utils`` (the causal mask, built every forward),
  ``pipeline_parallel.schedules`` (token counters), ``optimizer.*``, ``clip_grads``, the DDP buffers,
  the MoE aux-loss tracker and ``dist_checkpointing``: those modules see a view of ``torch`` whose
  tensor factories put CUDA-addressed tensors on the CPU (`_MODULES_WITH_CUDA_LITERALS`).
- ``param.type() == 'torch.cuda.FloatTensor'`` assertions in the (distributed) optimizer's
  parameter-group builders and ``clip_grad_by_total_norm_fp32``: those functions run under a
  ``TorchFunctionMode`` in which ``Tensor.type()`` reports the CUDA type name of a CPU tensor.
- ``tensor_parallel.random`` (``CudaRNGStatesTracker``, ``model_parallel_cuda_manual_seed``): the
  "CUDA generator" becomes the CPU default generator, so tracker ``fork()`` swaps the CPU state in
  and out exactly as it swaps the CUDA state on a GPU. Dropout is reproducible and differs per TP rank.
  The tracker's "CPU RNG state changed within GPU RNG context" warning is then always true, and
  filtered out.
- ``moe_utils.te_general_gemm``: left undefined when Transformer Engine is missing (a NameError in
  the router GEMM); defined as ``None`` so the plain ``torch.mm`` path runs.
- ``token_dispatcher.maybe_move_tensor_to_cpu``: on a GPU it turns all-to-all split sizes into host
  numpy arrays; for CPU tensors it leaves them as tensors, which gloo's ``all_to_all_single``
  rejects. CPU mode converts them.
- ``DistributedOptimizer`` without apex / Transformer Engine (always the case on CPU) keeps Adam's
  ``step`` in torch's per-parameter state: ``state_dict()`` asserts on a fresh optimizer that has
  no state yet (which loading a checkpoint asks for first), and the fully-reshardable loader
  copies every state key but ``step`` from the checkpoint (a KeyError), after ``load_state_dict``
  gave all parameters one shared ``step`` tensor, which torch's Adam then increments once per
  parameter. CPU mode gives a fresh optimizer its step-0 state, keeps the restored ``step`` aside
  during that copy, and gives every parameter its own ``step`` tensor.
- ``jit_fuser`` (``torch.compile``): megatron-core's fused kernels are compiled for the GPU; on CPU
  they would invoke Inductor and a C++ compiler per function, so TorchDynamo is disabled and they
  run eagerly.

The sequence-parallel-capable norm is a module, not a patch: `bam_megatron.model.norm.TorchNorm`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bam_megatron.lazy_compile import COMPILE_DISABLE_ENV

TESTED_MEGATRON_CORE_VERSIONS = ("0.16.1",)

# megatron-core modules that create tensors with device="cuda" (found with grep; inference, FSDP,
# FP8 and CUDA-graph modules are out of scope on CPU).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
)

_TENSOR_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "eye",
    "linspace",
    "rand",
    "randn",
    "randint",
    "randperm",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
)

_active: _CpuMode | None = None


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

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_NULL_STREAM = _NullStream()


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


_TORCH_CUDA_STANDINS: dict[str, Any] = {
    # Nearly every caller passes this straight on as ``device=``; returning the CPU device (not an
    # ordinal) keeps those calls right wherever they run, backward included.
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


def _tensor_stays_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


# --------------------------------------------------------------------------------------------
# device="cuda" literals: a per-module view of torch whose factories allocate on the CPU.


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def create(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return create


class _TorchOnCpu(types.ModuleType):
    """``torch`` as one megatron-core module sees it in CPU mode. Attribute lookups are plain
    dict lookups (the namespace is copied); only the tensor factories are wrapped."""

    def __init__(self) -> None:
        super().__init__("torch", torch.__doc__)
        self.__dict__.update(vars(torch))
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:  # submodules torch imports lazily, after the copy
        return getattr(torch, name)


# --------------------------------------------------------------------------------------------
# param.type() == 'torch.cuda.FloatTensor' assertions.


class _CudaTypeNames(TorchFunctionMode):
    """``Tensor.type()`` without arguments answers with the CUDA type name of a CPU tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _CudaTypeNames():
            return fn(*args, **kwargs)

    return run


# --------------------------------------------------------------------------------------------
# The distributed optimizer's Adam 'step' without apex / Transformer Engine.


def _zero_adam_state(inner: torch.optim.Optimizer) -> None:
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state[param]
            if "step" not in state:
                state.update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                )


def _state_dict_of_fresh_optimizer(state_dict: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(state_dict)
    def run(self: Any) -> Any:
        if len(self.optimizer.state) == 0 and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            _zero_adam_state(self.optimizer)  # what the first step would create
        return state_dict(self)

    return run


def _set_states_keeping_step(set_states: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(set_states)
    def run(self: Any, model_param: Any, tensors: dict) -> Any:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)  # load_state_dict restored it already
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return run


def _load_state_dict_untying_steps(load_state_dict: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_state_dict)
    def run(self: Any, state_dict: Any) -> Any:
        result = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()  # Adam increments it in place
        return result

    return run


# --------------------------------------------------------------------------------------------
# The rest: RNG, MoE all-to-all split sizes, te_general_gemm.


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU twin of moe_utils.maybe_move_tensor_to_cpu: split sizes become numpy for gloo."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().numpy()
    return tensor


_MISSING = object()


class _CpuMode:
    """The set of patches, recorded so that `uninstall` restores every original."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._fork_warning_filter = _DropForkWarning()
        self._dynamo_was_disabled: bool | None = None
        self._compile_env_was: str | None = None

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        # vars(), not getattr(): keeps staticmethod wrappers, and tells own from inherited attributes.
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def install(self) -> None:
        for name, standin in _TORCH_CUDA_STANDINS.items():
            self._patch(torch.cuda, name, standin)
        self._patch(torch.Tensor, "cuda", _tensor_stays_on_cpu)

        torch_on_cpu = _TorchOnCpu()
        for module_name in _MODULES_WITH_CUDA_LITERALS:
            self._patch(importlib.import_module(module_name), "torch", torch_on_cpu)

        optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
        distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
        clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
        checked = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        self._patch(clip_grads, "clip_grad_by_total_norm_fp32", checked)
        self._patch(optimizer, "clip_grad_by_total_norm_fp32", checked)  # imported by name there
        build_groups = distrib.DistributedOptimizer._build_model_and_main_param_groups
        self._patch(
            distrib.DistributedOptimizer,
            "_build_model_and_main_param_groups",
            staticmethod(_with_cuda_type_names(build_groups)),
        )
        dist_opt = distrib.DistributedOptimizer
        self._patch(dist_opt, "state_dict", _state_dict_of_fresh_optimizer(dist_opt.state_dict))
        self._patch(dist_opt, "load_state_dict", _load_state_dict_untying_steps(dist_opt.load_state_dict))
        self._patch(
            dist_opt,
            "_set_main_param_and_optimizer_states",
            _set_states_keeping_step(dist_opt._set_main_param_and_optimizer_states),
        )
        fp16 = optimizer.Float16OptimizerWithFloat16Params
        self._patch(fp16, "__init__", _with_cuda_type_names(fp16.__init__))

        rng = importlib.import_module("megatron.core.tensor_parallel.random")
        self._patch(rng, "_get_cuda_rng_state", _cpu_get_rng_state)
        self._patch(rng, "_set_cuda_rng_state", _cpu_set_rng_state)
        logging.getLogger(rng.__name__).addFilter(self._fork_warning_filter)

        moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
        if not hasattr(moe_utils, "te_general_gemm"):
            self._patch(moe_utils, "te_general_gemm", None)
        dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
        self._patch(dispatcher, "maybe_move_tensor_to_cpu", _splits_to_host)

        # TorchDynamo off (nothing is compiled on CPU), without importing it (4-5 s of a busy start):
        # its config reads TORCH_COMPILE_DISABLE when it is first imported; set it directly if it is in.
        self._compile_env_was = os.environ.get(COMPILE_DISABLE_ENV)
        os.environ[COMPILE_DISABLE_ENV] = "1"
        dynamo = sys.modules.get("torch._dynamo")
        self._dynamo_was_disabled = dynamo.config.disable if dynamo is not None else None
        if dynamo is not None:
            dynamo.config.disable = True
        # A CUDA tuning hint that megatron-core repeats on every sequence-parallel linear layer.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
        self._warning_filter = warnings.filters[0]

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(self._warning_filter)
        if self._compile_env_was is None:
            os.environ.pop(COMPILE_DISABLE_ENV, None)
        else:
            os.environ[COMPILE_DISABLE_ENV] = self._compile_env_was
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None:
            was = self._dynamo_was_disabled
            dynamo.config.disable = was if was is not None else self._compile_env_was == "1"
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(self._fork_warning_filter)
        for owner, name, original in reversed(self._saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()


__all__ = ["enable", "disable", "is_active", "TESTED_MEGATRON_CORE_VERSIONS"]
