"""Core attention on PyTorch's scaled_dot_product_attention: the local backend's attention kernel.

A drop-in for megatron-core's DotProductAttention (same constructor and call) that hands the
[sq, b, heads, d] tensors to ``F.scaled_dot_product_attention``: fused, blocked kernels on CPU
(and flash / memory-efficient ones on GPU without Transformer Engine) instead of materialising
the full score matrix. Grouped-query attention maps directly: megatron-core keeps each KV group's
query heads contiguous, which is SDPA's ``enable_gqa`` convention.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """softmax(Q Kᵀ · scale + mask) V for causal or explicitly masked self-attention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.softcap = getattr(config, "attn_logit_softcapping", None)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query [sq, b, np, d], key/value [sk, b, ng, d] -> context [sq, b, np·d].

        ``attention_mask`` follows megatron-core: True marks a position that must NOT be attended.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention_bias nor packed sequences")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and query.shape[0] > 1
        allowed = None if attention_mask is None else ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]

        def attend(dropout_p: float) -> torch.Tensor:
            if self.softcap is not None:
                return softcapped_attention(q, k, v, allowed, causal, self.scale, self.softcap, dropout_p)
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )

        if self.training and self.dropout_p > 0:
            # Attention dropout differs per TP rank (each holds other heads), as in megatron-core.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend(self.dropout_p)
        else:
            context = attend(0.0)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def softcapped_attention(q, k, v, allowed, causal: bool, scale: float, cap: float, dropout_p: float) -> torch.Tensor:
    """softmax(cap·tanh(Q Kᵀ · scale / cap) + mask) V on [b, heads, s, d] (Gemma 2's attention, which
    ``F.scaled_dot_product_attention`` cannot compute): the same masks as it (``causal``: top-left
    aligned; ``allowed``: True where attended), grouped-query heads repeated, softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = torch.tanh(scores / cap) * cap
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs, v)
