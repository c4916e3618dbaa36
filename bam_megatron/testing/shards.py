"""Move whole tensors in and out of a model-parallel model through its `sharded_state_dict`.

megatron-core already declares, for every parameter, where its local shard sits in the global
tensor (TP splits, EP expert slices, PP layer offsets, SwiGLU's interleaved halves). Equivalence
tests use exactly that declaration, and nothing hand-written per layer, to give a TP/EP/PP model
the same weights as a one-rank model and to reassemble its gradients for comparison.
"""

from __future__ import annotations

import contextlib

import torch

from bam_megatron.model.shards import copy_from_full, data_replaced, global_slices, sharded_tensors

Shard = tuple[str, tuple[int, ...], tuple[slice, ...], torch.Tensor]


def gradients_as_weights(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Temporarily put each parameter's gradient (``main_grad`` under DDP) where its data is."""

    def gradient(param: torch.nn.Parameter) -> torch.Tensor:
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
        return grad

    return data_replaced(model, gradient)


def local_shards(model: torch.nn.Module, gradients: bool = False) -> list[Shard]:
    """This rank's pieces of every checkpointed tensor, as (key, global shape, slices, data)."""
    ctx = gradients_as_weights(model) if gradients else contextlib.nullcontext()
    with ctx:
        return [
            (sh.key, tuple(sh.global_shape), global_slices(sh), sh.data.detach().clone())
            for sh in sharded_tensors(model)
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


def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy each parameter's shard out of whole tensors (the inverse of `assemble`)."""
    copy_from_full(model, full)
