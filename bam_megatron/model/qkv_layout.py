"""megatron-core's fused QKV weight layout, and how N dense attentions become one soft MoA.

``linear_qkv.weight`` holds, for each KV group in turn, that group's query heads, then its key
head, then its value head (``[G, H/G + 2, d_head, d_model]`` flattened); tensor parallelism
splits it by groups. ``linear_qkv.bias`` (Qwen2's QKV biases) has the same rows. The output
projection's input columns follow the query heads' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.soft_moa import wide_head_sources


def split_qkv(weight: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV weight -> (Q [H, d, in], K [G, d, in], V [G, d, in])."""
    per_group = heads // groups
    w = weight.view(groups, per_group + 2, -1, weight.shape[-1])
    q = w[:, :per_group].reshape(heads, -1, weight.shape[-1])
    return q, w[:, per_group], w[:, per_group + 1]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(Q [H, d, in], K [G, d, in], V [G, d, in]) -> fused QKV weight [(H + 2G)·d, in]."""
    groups, d, d_in = k.shape
    q = q.reshape(groups, -1, d, d_in)
    return torch.cat([q, k.unsqueeze(1), v.unsqueeze(1)], dim=1).reshape(-1, d_in)


def soft_moa_qkv(
    expert_qkv: Sequence[torch.Tensor],
    config: BAMConfig,
    shared_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """One soft-MoA attention's fused QKV weight from N dense attentions' ([rows, in] each; a
    ``linear_qkv.bias`` goes through as a weight of one column, [rows, 1]).

    Expert KV keeps every expert's K and V. Shared KV uses ``shared_kv`` (K, V as [G, d, in]),
    by default the average of the experts' K and V; query heads are permuted into the grouped
    order (`wide_head_sources`).
    """
    n, heads, groups = config.num_attention_experts, config.num_attention_heads, config.num_query_groups
    if len(expert_qkv) != n:
        raise ValueError(f"expected {n} attention experts, got {len(expert_qkv)} QKV tensors")
    qs, ks, vs = zip(*(split_qkv(w, heads, groups) for w in expert_qkv))
    sources = wide_head_sources(config)
    q = torch.stack(qs)[sources[:, 0], sources[:, 1]]  # [N·H, d, in] in wide head order
    if config.attention_kv_mode == "expert":
        k, v = torch.cat(ks), torch.cat(vs)
    else:
        k, v = shared_kv if shared_kv is not None else (torch.stack(ks).mean(0), torch.stack(vs).mean(0))
    return merge_qkv(q, k, v)


def soft_moa_qk_norms(
    q_norms: Sequence[torch.Tensor], k_norms: Sequence[torch.Tensor], config: BAMConfig, shared_k=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """N dense attentions' Q and K norm weights -> the soft MoA's. Per head (Qwen3: [d] each,
    `ExpertHeadNorm`): Q [N, d], one row per expert; K [N, d] (expert KV) or one [d]. Over the
    projection (OLMo 2: [H·d] and [H_kv·d], `ProjectionRMSNorm`): Q [N·H·d] in the wide attention's
    head order; K [N·H_kv·d], expert-major (expert KV), or one [H_kv·d]. Shared KV: ``shared_k``,
    by default the experts' average, as the shared K projection."""
    if config.qk_layernorm_scope == "projection":
        sources = wide_head_sources(config)
        qs = torch.stack([q.view(config.num_attention_heads, -1) for q in q_norms])  # [N, H, d]
        q = qs[sources[:, 0], sources[:, 1]].reshape(-1)
        if config.attention_kv_mode == "shared":
            return q, shared_k if shared_k is not None else torch.stack(list(k_norms)).mean(0)
        return q, torch.cat(list(k_norms))
    q, k = torch.stack(list(q_norms)), torch.stack(list(k_norms))
    if config.attention_kv_mode == "shared":
        k = shared_k if shared_k is not None else k.mean(0)
    return q, k


def split_soft_moa_qk_norms(q: torch.Tensor, k: torch.Tensor, config: BAMConfig) -> tuple[list, list]:
    """The inverse of `soft_moa_qk_norms`: each expert's Q norm and (expert KV) K norm, as its dense
    attention's; shared KV: no K norms (the one K norm is the mixture's)."""
    n = config.num_attention_experts
    if config.qk_layernorm_scope != "projection":
        return list(q), [] if config.attention_kv_mode == "shared" else list(k)
    sources = wide_head_sources(config)
    wide = q.view(len(sources), -1)
    qs = [wide[sources[:, 0] == e][torch.argsort(sources[sources[:, 0] == e, 1])].reshape(-1) for e in range(n)]
    return qs, [] if config.attention_kv_mode == "shared" else list(k.chunk(n))


def soft_moa_attention_weights(
    expert_qkv: Sequence[torch.Tensor],
    expert_proj: Sequence[torch.Tensor],
    config: BAMConfig,
    shared_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One soft-MoA attention's (linear_qkv, linear_proj) weights from N dense attentions'
    (`soft_moa_qkv`); the output projection's columns follow the query heads (`wide_head_sources`)."""
    n, heads = config.num_attention_experts, config.num_attention_heads
    if len(expert_proj) != n:
        raise ValueError(f"expected {n} attention experts, got {len(expert_proj)} projections")
    qkv = soft_moa_qkv(expert_qkv, config, shared_kv)
    sources = wide_head_sources(config)
    d = expert_proj[0].shape[1] // heads
    projs = torch.stack([p.view(p.shape[0], heads, d) for p in expert_proj])  # [N, out, H, d]
    proj = projs[sources[:, 0], :, sources[:, 1]].permute(1, 0, 2).reshape(projs.shape[1], -1)
    return qkv, proj


def split_soft_moa_qkv(qkv: torch.Tensor, config: BAMConfig) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The inverse of `soft_moa_qkv`: each expert's Q [H, d, in] and the wide attention's K and V
    [G_wide, d, in] (expert KV: expert e's groups are rows e·G to (e+1)·G; shared KV: the G shared)."""
    n, heads = config.num_attention_experts, config.num_attention_heads
    q, k, v = split_qkv(qkv, n * heads, config.attention_kv_groups)
    sources = wide_head_sources(config)
    qs = torch.empty(n, heads, *q.shape[1:], dtype=q.dtype)
    qs[sources[:, 0], sources[:, 1]] = q
    return list(qs), k, v


def split_soft_moa_attention(
    qkv: torch.Tensor, proj: torch.Tensor, config: BAMConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The inverse of `soft_moa_attention_weights`: a soft-MoA attention's weights -> each expert's
    Q [H, d, in] and output projection [out, H·d], and the wide attention's K and V [G_wide, d, in]
    (`split_soft_moa_qkv`)."""
    n, heads = config.num_attention_experts, config.num_attention_heads
    qs, k, v = split_soft_moa_qkv(qkv, config)
    sources = wide_head_sources(config)
    d = proj.shape[1] // (n * heads)
    wide = proj.view(proj.shape[0], n * heads, d).permute(1, 0, 2)  # [N·H, out, d] in wide head order
    per_expert = torch.empty(n, proj.shape[0], heads, d, dtype=proj.dtype)
    per_expert[sources[:, 0], :, sources[:, 1]] = wide
    return qs, [p.reshape(proj.shape[0], heads * d) for p in per_expert], k, v
