"""megatron-core's SelfAttention with a KV cache of keys *after* RoPE (static-batching decode).

megatron-core 0.16.1 caches keys before RoPE on its static-batching path and rotates every cached
key again at every decode step (``Attention.forward`` applies ``k_pos_emb[:sequence_end]`` to the
whole cache): O(context) extra work per step and layer, 5-15% of a CPU decode step at the
paper-590m shapes (docs/benchmarks.md). Its flash-decode and dynamic-batching paths already cache
rotated keys. `RotatedCacheSelfAttention` does the same on the static path, at the one seam where
the cache is written (`AttentionSeams.adjust_key_value_for_inference`, megatron-core's
``_adjust_key_value_for_inference``) rotates this step's query and key at
their positions, stores the key, and hands ``forward`` no RoPE to apply. Training and prefill-free
forwards (no inference context) are megatron-core's own code, unchanged; so is the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention

from bam_megatron.platform.internals import AttentionSeams


class RotatedCacheSelfAttention(AttentionSeams, SelfAttention):
    """SelfAttention whose static KV cache holds rotated keys, so a decode step rotates only its own;
    a local layer (Gemma 3's ``local_rotary_base``) rotates at its own base (`layer_rope`)."""

    def forward(self, *args: Any, rotary_pos_emb: Any = None, **kwargs: Any):
        """megatron-core's forward, with this layer's RoPE."""
        return super().forward(*args, rotary_pos_emb=self.layer_rope(rotary_pos_emb), **kwargs)

    def layer_rope(self, rotary_pos_emb: Any) -> Any:
        """GPTModel's one RoPE table [s, 1, 1, d] (or a (q, k) pair), or for a local layer (its number not a
        multiple of ``global_attention_every``) the same positions at ``local_rotary_base``.

        megatron-core computes one table for every layer, angles ``position x inv_freq`` with
        ``inv_freq[0] = base^0 = 1`` (unchanged by Llama-3 scaling, which keeps high frequencies):
        channel 0 is the position itself, exactly, and the local angles are ``position x
        local_inv_freq`` as megatron-core (and transformers) compute them.
        """
        base, every = self.config.local_rotary_base, self.config.global_attention_every
        if rotary_pos_emb is None or base is None or self.layer_number % every == 0:
            return rotary_pos_emb
        if isinstance(rotary_pos_emb, tuple):
            return tuple(self.layer_rope(emb) for emb in rotary_pos_emb)
        d = rotary_pos_emb.shape[-1]
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=rotary_pos_emb.device) / d
        angles = rotary_pos_emb[..., :1] * (1.0 / (base**exponents))
        return torch.cat([angles, angles], dim=-1)

    def adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        """megatron-core's KV-cache step, with this step's query and key rotated before the key is cached."""
        if (
            inference_context is not None
            and inference_context.is_static_batching()
            and rotary_pos_emb is not None
            and not self.config.flash_decode  # flash decode rotates before caching itself
        ):
            query, key = self.rotate_at_positions(query, key, rotary_pos_emb, inference_context.sequence_len_offset)
            rotary_pos_emb = None
        return super().adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )

    def rotate_at_positions(self, query, key, rotary_pos_emb: Any, offset: int):
        """RoPE on ``query`` and ``key`` [s, b, heads, d] at positions ``offset`` .. ``offset + s - 1``."""
        if not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        q_emb, k_emb = rotary_pos_emb
        cp_group = self.pg_collection.cp
        query = apply_rotary_pos_emb(
            query, q_emb[offset : offset + query.shape[0]], config=self.config, cp_group=cp_group
        )
        key = apply_rotary_pos_emb(key, k_emb[offset : offset + key.shape[0]], config=self.config, cp_group=cp_group)
        return query, key
