"""Move whole tensors in and out of a model-parallel model through its `sharded_state_dict`.

megatron-core already declares, for every parameter, where its local shard sits in the global
tensor (TP splits, EP expert slices, PP layer offsets, SwiGLU's interleaved halves). Equivalence
tests use exactly that declaration, and nothing hand-written per layer, to give a TP/EP/PP model
the same weights as a one-rank model and to reassemble its gradients for comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

Shard = tuple[str, tuple[int, ...], tuple[slice, ...], torch.Tensor]


def _sharded_tensors(model: torch.nn.Module) -> Iterator[ShardedTensor]:
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            yield from nested_values(item.build())
        elif isinstance(item, ShardedTensor):
            yield item


def _global_slices(sh: ShardedTensor) -> tuple[slice, ...]:
    if sh.flattened_range is not None:
        raise ValueError(f"{sh.key}: flattened shards are not supported here")
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(off, off + n) for off, n in zip(sh.global_offset, local))


@contextlib.contextmanager
def gradients_as_weights(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily put each parameter's gradient (``main_grad`` under DDP) where its data is."""
    saved = []
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
        saved.append((param, param.data))
        param.data = grad.view_as(param)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def local_shards(model: torch.nn.Module, gradients: bool = False) -> list[Shard]:
    """This rank's pieces of every checkpointed tensor, as (key, global shape, slices, data)."""
    ctx = gradients_as_weights(model) if gradients else contextlib.nullcontext()
    with ctx:
        return [
            (sh.key, tuple(sh.global_shape), _global_slices(sh), sh.data.detach().clone())
            for sh in _sharded_tensors(model)
            if not sh.key.endswith("_extra_state")
        ]


def assemble(shards_per_rank: list[list[Shard]]) -> dict[str, torch.Tensor]:
    """Whole tensors from all ranks' shards (replicas must agree; the first one is kept)."""
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}
    for shards in shards_per_rank:
        for key, shape, slices, data in shards:
            if key not in full:
                full[key] = torch.zeros(shape, dtype=data.dtype)
                filled[key] = torch.zeros(shape, dtype=torch.bool)
            full[key][slices] = data.reshape(full[key][slices].shape)
            filled[key][slices] = True
    missing = [key for key, mask in filled.items() if not bool(mask.all())]
    if missing:
        raise ValueError(f"no rank holds part of {missing}")
    return full


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy each parameter's shard out of whole tensors (the inverse of `assemble`)."""
    for sh in _sharded_tensors(model):
        if sh.key.endswith("_extra_state"):
            continue
        if sh.key not in full:
            raise KeyError(f"no full tensor for {sh.key}")
        sh.data.copy_(full[sh.key][_global_slices(sh)].reshape(sh.data.shape))
