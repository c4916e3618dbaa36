"""Freeze some experts of a mixture while the rest of it trains (``--freeze-old-experts``).

An expert's weights are slices of wider tensors: FFN expert e is slot e of the expert axis, and a
soft-MoA attention expert is a set of rows of the one wide ``linear_qkv`` and columns of
``linear_proj`` (in the head order of `qkv_layout.soft_moa_attention_weights`). So experts are
frozen by masking gradients, not by ``requires_grad``: a mask per parameter, 1 where the weight
belongs to a frozen expert, built in global (checkpoint) coordinates and cut to this rank's shard by
megatron-core's own sharding declaration (`model.shards`), so it holds at any TP/EP/PP layout.

Adam (and SGD) never move a weight whose gradient was always zero, but decoupled weight decay would
still shrink it; parameters that hold frozen slices therefore get no weight decay (megatron-core's
``config_overrides``), which also applies to the trainable slices that share a tensor with them.
Routers and everything the experts share (embeddings, norms, BTX's attention, shared K/V) train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.qkv_layout import soft_moa_attention_weights
from bam_megatron.model.shards import copy_from_full, data_replaced, sharded_tensors

FROZEN_ATTRIBUTE = "bam_frozen_experts"
"""Set on parameters that hold frozen expert slices; the optimizer gives them no weight decay."""

_FFN_EXPERTS = ".mlp.experts."
_ATTENTION = (".self_attention.linear_qkv.weight", ".self_attention.linear_proj.weight")


def _global_masks(model: torch.nn.Module, config: BAMConfig, frozen: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per checkpoint key, a global tensor that is 1 on the weights of the ``frozen`` experts."""
    masks: dict[str, torch.Tensor] = {}
    soft_moa = getattr(config, "uses_soft_moa", False)
    shapes = {sh.key: tuple(sh.global_shape) for sh in sharded_tensors(model)}
    for key, shape in shapes.items():
        if _FFN_EXPERTS in key:  # [layers, experts, ...]
            if shape[1] != config.num_moe_experts:
                raise RuntimeError(f"{key}: expected the expert axis second in {shape}")
            mask = torch.zeros(shape)
            mask[:, list(frozen)] = 1
            masks[key] = mask
        elif soft_moa and key.endswith(_ATTENTION) and key not in masks:
            masks.update(_attention_masks(key, shapes, config, frozen))
    return masks


def _attention_masks(key: str, shapes: dict[str, tuple], config: BAMConfig, frozen: Sequence[int]):
    """Global masks of one soft-MoA attention's (linear_qkv, linear_proj): the frozen experts' Q, O
    and (expert KV) K, V. Laid out by the same function that builds the wide attention."""
    prefix = key.rsplit(".self_attention.", 1)[0]
    qkv_key, proj_key = (prefix + suffix for suffix in _ATTENTION)
    layers, _, hidden = shapes[qkv_key]
    d, heads = config.kv_channels, config.num_attention_heads
    groups = config.num_query_groups or heads
    n = config.num_attention_experts
    expert_qkv = [torch.full(((heads + 2 * groups) * d, hidden), float(e in frozen)) for e in range(n)]
    expert_proj = [torch.full((shapes[proj_key][1], heads * d), float(e in frozen)) for e in range(n)]
    shared_kv = None
    if config.attention_kv_mode == "shared":  # one K/V serves every expert: it trains
        shared_kv = (torch.zeros(groups, d, hidden), torch.zeros(groups, d, hidden))
    qkv, proj = soft_moa_attention_weights(expert_qkv, expert_proj, config, shared_kv)
    return {qkv_key: qkv.expand(layers, *qkv.shape), proj_key: proj.expand(layers, *proj.shape)}


def freeze_experts(model: torch.nn.Module, config: BAMConfig, frozen: Sequence[int]) -> int:
    """Mask the gradients of experts ``frozen`` (attention and FFN) in ``model``; return how many
    weights this rank froze. Call before wrapping the model in DDP and building the optimizer."""
    full = _global_masks(model, config, frozen)
    with data_replaced(model, lambda param: torch.zeros(param.shape, dtype=torch.float32)):
        copy_from_full(model, full, strict=False)
        local = {param: param.data.bool() for param in model.parameters()}
    count = 0
    for param, mask in local.items():
        if not bool(mask.any()):
            continue
        # A tensor hook runs before the gradient is accumulated (into .grad, and from there into
        # megatron-core DDP's main_grad buffer), so the frozen slices never see a gradient.
        param.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0))
        setattr(param, FROZEN_ATTRIBUTE, True)
        count += int(mask.sum())
    return count


def no_weight_decay_on_frozen() -> dict[ParamKey, ParamGroupOverride]:
    """The optimizer override that spares parameters holding frozen slices from weight decay."""
    return {ParamKey(attr=FROZEN_ATTRIBUTE): ParamGroupOverride(wd_mult=0.0)}
