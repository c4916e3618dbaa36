"""Where each local parameter shard sits in its global (checkpoint) tensor.

megatron-core declares it for every parameter through ``sharded_state_dict`` (TP splits, EP expert
slices, PP layer offsets, SwiGLU's interleaved halves). Code that moves whole tensors in or out of a
model at any layout reads that declaration instead of re-deriving it per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def sharded_tensors(model: torch.nn.Module) -> Iterator[ShardedTensor]:
    """Every ShardedTensor of the model's sharded state dict, factories built, extra state left out."""
    for item in nested_values(model.sharded_state_dict()):
        tensors = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
        for sh in tensors:
            if isinstance(sh, ShardedTensor) and not sh.key.endswith("_extra_state"):
                yield sh


def global_slices(sh: ShardedTensor) -> tuple[slice, ...]:
    """The slices of the global tensor ``sh.key`` that this rank's ``sh.data`` holds."""
    if sh.flattened_range is not None:
        raise ValueError(f"{sh.key}: flattened shards are not supported here")
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(off, off + n) for off, n in zip(sh.global_offset, local))


@torch.no_grad()
def copy_from_full(model: torch.nn.Module, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy each parameter's shard out of whole (global) tensors keyed like the checkpoint.

    With ``strict=False``, parameters whose key ``full`` lacks are left as they are.
    """
    for sh in sharded_tensors(model):
        if sh.key not in full:
            if strict:
                raise KeyError(f"no full tensor for {sh.key}")
            continue
        sh.data.copy_(full[sh.key][global_slices(sh)].reshape(sh.data.shape))


@contextlib.contextmanager
def data_replaced(model: torch.nn.Module, replacement: Callable[[torch.nn.Parameter], torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``replacement(param)`` each parameter's data, so that `sharded_tensors` views
    it: a way to read or write a tensor of a parameter's shape (its gradient, a mask) in global terms."""
    saved = [(param, param.data) for param in model.parameters()]
    for param, _ in saved:
        param.data = replacement(param).view_as(param)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data
