"""Model variants and presets: one function from a variant name to a megatron-core GPTModel.

Variants (docs/design.md §1):

- ``dense``: the seed and the dense experts (parallel block, one attention, dense SwiGLU FFN);
- ``bam``: soft MoA over N attention experts (expert KV) + N FFN experts (top-k MoE);
- ``bam-shared-kv``: as ``bam``, one K/V shared by all attention experts;
- ``btx``: one (averaged) attention + N FFN experts: the Branch-Train-MiX baseline
  (also the architecture of sparse upcycling).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel

from bam_megatron.errors import ConfigError
from bam_megatron.model.variants import PRESETS, SOFT_MOA_VARIANTS, VARIANTS

if TYPE_CHECKING:
    from bam_megatron.model.architecture import Architecture
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.gpt import gpt_model
from bam_megatron.model.specs import get_bam_block_spec

# Defaults shared by every variant: SwiGLU, RMSNorm, no biases, fp32 softmax routers.
_COMMON = dict(
    gated_linear_unit=True,
    activation_func=F.silu,
    normalization="RMSNorm",
    add_bias_linear=False,
    bias_activation_fusion=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
    pipeline_dtype=torch.float32,
)

# FFN experts: softmax, then top-k without renormalisation; Switch load balancing + z-loss.
_MOE = dict(
    moe_router_pre_softmax=True,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-2,
    moe_z_loss_coeff=1e-3,
    moe_token_dispatcher_type="alltoall",
)


def variant_config(
    variant: str,
    preset: Optional[str] = None,
    num_experts: int = 4,
    moe_router_topk: int = 1,
    **overrides: Any,
) -> BAMConfig:
    """A BAMConfig for ``variant``; sizes from ``preset`` (if given), then any TransformerConfig
    or BAMConfig field in ``overrides`` (Megatron names: ``num_layers``, ``hidden_size``, …)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    fields: dict[str, Any] = dict(_COMMON)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        p = PRESETS[preset]
        fields.update(
            hidden_size=p.hidden_size,
            num_layers=p.num_layers,
            num_attention_heads=p.num_attention_heads,
            num_query_groups=p.num_query_groups,
            ffn_hidden_size=p.ffn_hidden_size,
        )
    if variant != "dense":
        fields.update(_MOE, num_moe_experts=num_experts, moe_router_topk=moe_router_topk)
    if variant in SOFT_MOA_VARIANTS:
        fields.update(num_attention_experts=num_experts)
        fields.update(attention_kv_mode="shared" if variant == "bam-shared-kv" else "expert")
    fields.update(overrides)
    if "moe_ffn_hidden_size" not in fields and fields.get("num_moe_experts"):
        fields["moe_ffn_hidden_size"] = fields.get("ffn_hidden_size")
    known = {f.name for f in dataclasses.fields(BAMConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown model settings: {', '.join(unknown)}")
    return BAMConfig(**fields)


def build_model(
    config: BAMConfig,
    vocab_size: int,
    max_sequence_length: int,
    untie_embeddings: bool = True,
    backend: str = "auto",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """A GPTModel (RoPE) holding this rank's pipeline stage of the model ``config`` describes."""
    return gpt_model(
        config,
        get_bam_block_spec(config, backend),
        vocab_size,
        max_sequence_length,
        untie_embeddings,
        pre_process,
        post_process,
    )


def build_from_architecture(
    architecture: Architecture,
    config: BAMConfig,
    max_sequence_length: int,
    backend: str = "auto",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """`build_model` for ``architecture`` (its vocabulary and embedding tying) with ``config``,
    which `Architecture.model_config` made with the builder's parallel layout and settings."""
    return build_model(
        config,
        architecture.padded_vocab_size,
        max_sequence_length,
        untie_embeddings=architecture.untie_embeddings_and_output_weights,
        backend=backend,
        pre_process=pre_process,
        post_process=post_process,
    )
