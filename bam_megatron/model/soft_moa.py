"""Soft mixture of attention (soft MoA) as one megatron-core self-attention with N·H heads.

For N attention experts, each a full multi-head attention with its own Q, K, V and output O::

    Attn(x̂) = Σ_j g_j(x̂) · O_j · MHA_j(x̂) = [O_1 … O_N] · concat_j(g_j(x̂) · MHA_j(x̂))

so soft MoA is an ordinary self-attention with N·H heads whose per-head outputs are scaled by
their expert's gate before one shared output projection: one QKV GEMM, one attention kernel call,
one output GEMM. Tensor parallelism splits the N·H heads across ranks like any attention.

Head order (megatron-core's grouped layout: each KV group's query heads, then its K and V):

- expert KV: N·H_kv groups, expert-major; head i belongs to expert i // H.
- shared KV: H_kv groups shared by all experts; group g holds, for each expert in turn, that
  expert's H/H_kv heads of group g. Checkpoint conversion permutes Q rows / O columns into it.

Qwen-style attention: each expert's Q/K/V biases are its rows of the wide ``linear_qkv`` bias,
like its weights; its per-head Q and K norms (Qwen3's; one weight of size head_dim per dense
model) are rows of an `ExpertHeadNorm`, which scales each head by its expert's row. With shared KV
the K norm is one ordinary norm, the shared K's.

Incremental decoding (megatron-core's `StaticInferenceContext`) goes through megatron-core's own
KV-cache code, `Attention._adjust_key_value_for_inference`: the cache holds the wide attention's
key/value groups, N·H_kv per layer for expert KV and H_kv (one cache for all experts) for shared
KV. Keys are cached after RoPE, so a decode step rotates only its own query and key. The gates
need no cache: they depend only on the current tokens' hidden states.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.rope_cache import RotatedCacheSelfAttention
from bam_megatron.model.router import AttentionRouter


@dataclass
class SoftMoASelfAttentionSubmodules(SelfAttentionSubmodules):
    """SelfAttention's submodules plus the attention router."""

    router: Union[ModuleSpec, type] = AttentionRouter


def wide_attention_config(config: BAMConfig) -> BAMConfig:
    """The config of the one attention that computes all N experts: N·H query heads."""
    wide = copy.copy(config)
    wide.num_attention_heads = config.num_attention_heads * config.num_attention_experts
    wide.num_query_groups = config.attention_kv_groups
    return wide


def wide_head_sources(config: BAMConfig) -> torch.Tensor:
    """For each of the N·H heads of the wide attention, in order: (expert, head within expert)."""
    n, heads, groups = config.num_attention_experts, config.num_attention_heads, config.num_query_groups
    i = torch.arange(n * heads, device="cpu")  # a layout, read on the CPU even in a meta-device build
    if config.attention_kv_mode == "expert":
        return torch.stack([i // heads, i % heads], dim=1)
    # shared KV: group-major; within a group, each expert's heads // groups heads of that group
    per_group, per_expert_group = n * heads // groups, heads // groups
    group, slot = i // per_group, i % per_group
    expert = slot // per_expert_group
    return torch.stack([expert, group * per_expert_group + slot % per_expert_group], dim=1)


def head_to_expert(config: BAMConfig) -> torch.Tensor:
    """Expert index of each of the N·H heads, in the wide attention's head order."""
    return wide_head_sources(config)[:, 0]


def kv_group_to_expert(config: BAMConfig) -> torch.Tensor:
    """Expert KV: the expert of each of the N·H_kv K/V groups (expert-major)."""
    if config.attention_kv_mode != "expert":
        raise ValueError("shared KV: the K/V groups belong to every expert")
    return torch.arange(config.attention_kv_groups, device="cpu") // config.num_query_groups


def on_this_rank(per_head: torch.Tensor) -> torch.Tensor:
    """The entries of ``per_head`` (one per query head or K/V group of the wide attention) for the
    contiguous share of them this tensor-parallel rank computes (BAMConfig checks both divide)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    here = len(per_head) // tp
    first = parallel_state.get_tensor_model_parallel_rank() * here
    return per_head[first : first + here]


class ExpertHeadNorm(torch.nn.Module):
    """Each attention expert's own per-head norm (Qwen3's q_norm / k_norm) in the wide attention.

    A dense model's Q (or K) norm is one weight of size head_dim shared by its heads; N experts
    have N of them: ``weight`` [N, head_dim], whose row ``head_expert[h]`` scales head h.
    megatron-core calls it through SelfAttention's ``q_layernorm`` / ``k_layernorm`` seam on this
    TP rank's heads, query [s, b, heads, d] or key [s, b, groups, d]; ``head_expert`` (a ModuleSpec
    param, in the wide attention's order: `head_to_expert` / `kv_group_to_expert`) is cut to them.
    The weight is replicated across TP (the default sharded_state_dict); megatron-core's
    finalize_model_grads sums its gradient over TP, as for any q_layernorm / k_layernorm.
    """

    def __init__(self, config: BAMConfig, hidden_size: int, eps: float = 1e-5, *, head_expert: tuple[int, ...]) -> None:
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={config.normalization!r}: ExpertHeadNorm supports LayerNorm, RMSNorm")
        self.eps, self.rms = eps, config.normalization == "RMSNorm"
        self.one_plus = config.layernorm_zero_centered_gamma  # (1 + weight), as every norm then (Gemma's)
        self.weight = torch.nn.Parameter(
            (torch.zeros if self.one_plus else torch.ones)(config.num_attention_experts, hidden_size)
        )
        self.register_buffer("head_expert", on_this_rank(torch.tensor(head_expert)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, heads, d] -> each head normalised over d, times its expert's weight row."""
        shape = x.shape[-1:]
        # As TorchNorm's norms: RMSNorm, or LayerNorm without bias; the weight applied per head.
        if self.one_plus:
            y = x.float()
            y = F.rms_norm(y, shape, eps=self.eps) if self.rms else F.layer_norm(y, shape, eps=self.eps)
            return (y * (1.0 + self.weight[self.head_expert].float())).to(x.dtype)
        normed = F.rms_norm(x, shape, eps=self.eps) if self.rms else F.layer_norm(x, shape, eps=self.eps)
        return normed * self.weight[self.head_expert]


class SoftMoASelfAttention(RotatedCacheSelfAttention):
    """Soft MoA self-attention (docs/design.md §1). Takes the per-expert BAMConfig."""

    def __init__(
        self,
        config: BAMConfig,
        submodules: SoftMoASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        if config.context_parallel_size > 1:
            raise ValueError("soft MoA does not support context parallelism")
        super().__init__(
            wide_attention_config(config),
            submodules,
            layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.router = build_module(submodules.router, config=config)
        self.register_buffer("head_expert", on_this_rank(head_to_expert(config)), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
        inference_context: Any = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[s, b, h] -> (output [s, b, h] before the TP reduction of the output GEMM, bias).

        With ``inference_context`` (megatron-core's static-batching context, eval mode) the keys
        and values go into / come from its KV cache, as in megatron-core's ``Attention.forward``.
        """
        if packed_seq_params is not None:
            raise ValueError("soft MoA does not support packed sequences")
        if inference_context is not None:
            self._check_inference(inference_context, unused)
        rotary_pos_emb = self.layer_rope(rotary_pos_emb)  # a local layer's own RoPE base (Gemma 3)
        gates = self.router(hidden_states)  # g(x̂): [s, b, N], fp32; current tokens only, nothing cached
        query, key, value = self.get_query_key_value_tensors(hidden_states)  # N·H heads, one GEMM
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        attn_mask_type = self.attn_mask_type
        cp_group = self.pg_collection.cp
        if inference_context is not None:
            # megatron-core's static KV cache: store this step's K/V (its N·H_kv or H_kv groups),
            # rotated first (`RotatedCacheSelfAttention`), and return the keys and values of every
            # position so far; past the prompt, no mask.
            query, key, value, rotary_pos_emb, attn_mask_type, _ = self.adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb
            )
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb
            query = apply_rotary_pos_emb(query, q_emb, config=self.config, cp_group=cp_group)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config, cp_group=cp_group)

        if self.checkpoint_core_attention and self.training:
            heads = self.checkpointed_attention_forward(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=self.attn_mask_type,
                attention_bias=attention_bias,
            )
        else:
            # MHA_j(x̂) for every head of every expert: [s, b, heads·d]
            heads = self.core_attention(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=None,
            )

        # g_j(x̂) · MHA_j(x̂): each head scaled by its expert's gate
        s, b, _ = heads.shape
        head_gates = gates[..., self.head_expert].to(heads.dtype)  # [s, b, heads]
        heads = (heads.view(s, b, head_gates.shape[-1], -1) * head_gates.unsqueeze(-1)).view(s, b, -1)
        return self.linear_proj(heads)  # Σ_j O_j (…): one output GEMM

    def _check_inference(self, inference_context: Any, unused: dict[str, Any]) -> None:
        """Refuse the inference settings this attention does not implement (one message each)."""
        if self.training:
            raise ValueError("soft MoA decodes with an inference context in eval mode only (model.eval())")
        if not inference_context.is_static_batching():
            raise ValueError("soft MoA supports megatron-core's StaticInferenceContext only (no dynamic batching)")
        if self.config.flash_decode:
            raise ValueError("soft MoA does not support flash_decode")
        if any(unused.get(name) is not None for name in ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin")):
            raise ValueError("soft MoA takes RoPE as rotary_pos_emb only (no precomputed cos/sin)")
