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

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention

from bam_megatron.platform.internals import AttentionSeams


class RotatedCacheSelfAttention(AttentionSeams, SelfAttention):
    """SelfAttention whose static KV cache holds rotated keys, so a decode step rotates only its own."""

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
