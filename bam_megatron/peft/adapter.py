"""What MoV and MoLoRA adapters share: layout-independent initialisation, parameter attributes
for megatron-core's DDP and gradient finalisation, and checkpoint sharding.

An adapter is attached next to the linear it adapts (a sibling in the parent module, named
``<linear>_<method>``, e.g. ``linear_qkv_molora``) and changes the linear's input or output
through a forward hook, so the base model's modules, parameter names and checkpoint keys stay
exactly as they were.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Optional

import torch
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from bam_megatron.peft.config import PeftConfig
from bam_megatron.peft.parallel import LinearInfo
from bam_megatron.peft.router import AdapterRouter


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


class Adapter(torch.nn.Module):
    """Base class. Subclasses create parameters with `_param` and attach with `attach`.

    Args:
        info: the adapted linear's layout.
        config: the PEFT configuration.
        key: a name of the adapted linear that is the same under every parallel layout (global
            layer and expert numbers): it seeds the initialisation.
        device, dtype: of the adapted linear's weight.
    """

    def __init__(self, info: LinearInfo, config: PeftConfig, key: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.info, self.peft, self.key = info, config, key
        self.num_experts = config.num_experts
        self._device, self._dtype = device, dtype
        self.tp_axes: dict[str, int] = {}  # state-dict name -> axis split over TP (others replicated)
        self.router: Optional[AdapterRouter] = None

    # -- parameters -------------------------------------------------------------------------
    def _init(self, name: str, global_shape: tuple[int, ...], tp_axis: Optional[int], fill: str, std: float = 0.0):
        """This rank's piece of a tensor initialised whole (so TP=1 and TP=n hold the same values)."""
        if fill == "zeros":
            full = torch.zeros(global_shape)
        elif fill == "normal":
            gen = _generator(self.peft.seed, f"{self.key}.{name}")
            full = torch.empty(global_shape).normal_(0.0, std, generator=gen)
        else:
            raise ValueError(f"unknown fill {fill!r}")
        if tp_axis is not None:
            self.tp_axes[name] = tp_axis
            full = full.chunk(self.info.tp_size, dim=tp_axis)[self.info.tp_rank]
        return full.contiguous().to(device=self._device, dtype=self._dtype)

    def _param(
        self,
        name: str,
        global_shape: tuple[int, ...],
        tp_axis: Optional[int],
        fill: str,
        std: float = 0.0,
        sequence_parallel: bool = False,
    ) -> torch.nn.Parameter:
        """Register an adapter parameter with megatron-core's attributes.

        ``sequence_parallel``: the parameter is replicated over TP but each rank computes its
        gradient from its own sequence chunk (finalize_model_grads sums it over the TP group).
        """
        param = torch.nn.Parameter(self._init(name, global_shape, tp_axis, fill, std))
        self._mark(param, tp_axis, sequence_parallel)
        self.register_parameter(name, param)
        return param

    def _mark(self, param: torch.nn.Parameter, tp_axis: Optional[int], sequence_parallel: bool) -> None:
        param.allreduce = self.info.allreduce  # expert-parallel adapters reduce over expert-DP only
        param.sequence_parallel = sequence_parallel
        if tp_axis is not None and self.info.tp_size > 1:
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, tp_axis, 1

    def _router(self, global_in: int, tp_axis: Optional[int]) -> None:
        """One router [E, in] (none for a single expert: its gate is always 1)."""
        if self.num_experts == 1:
            return
        weight = self._init("router.weight", (self.num_experts, global_in), tp_axis, "normal", self.peft.router_std)
        self.router = AdapterRouter(weight, self.info)
        sp = tp_axis is None and self.info.sequence_parallel  # replicated, fed this rank's tokens
        self._mark(self.router.weight, tp_axis, sp)

    # -- hooks ------------------------------------------------------------------------------
    def attach(self, linear: torch.nn.Module) -> None:
        """Register this adapter's hook(s) on ``linear``."""
        raise NotImplementedError(f"{type(self).__name__} does not define attach(): each subclass does")

    @staticmethod
    def _output_hook(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """A forward hook for megatron-core linears, which return (output, bias)."""

        def hook(module, args, output):
            out, bias = output
            return fn(args[0], out), bias

        return hook

    # -- checkpoints ------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """dist_checkpointing tensors: TP-split along `tp_axes`, replicated otherwise; experts'
        offsets (``sharded_offsets``) come from megatron-core's SequentialMLP, as for the base."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            self.tp_axes,
            sharded_offsets,
            tp_group=self.info.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )

    def extra_repr(self) -> str:
        return f"{self.info.kind}-parallel, experts={self.num_experts}, key={self.key}"
