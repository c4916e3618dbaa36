"""The `BAMConfig` of a model variant: the settings every variant shares, then the mixtures'.

Variants (docs/design.md §1):

- ``dense``: the seed and the dense experts (parallel block, one attention, dense SwiGLU FFN);
- ``bam``: soft MoA over N attention experts (expert KV) + N FFN experts (top-k MoE);
- ``bam-shared-kv``: as ``bam``, one K/V shared by all attention experts;
- ``btx``: one (averaged) attention + N FFN experts: the Branch-Train-MiX baseline
  (also the architecture of sparse upcycling).

`bam_megatron.model.architecture.Architecture.model_config` builds its config here; the models
themselves are built by `bam_megatron.model.builder`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F

from bam_megatron.errors import ConfigError
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.moe_defaults import MOE_ROUTER_PRE_SOFTMAX, MOE_TRAINING_DEFAULTS
from bam_megatron.model.variants import DEFAULT_NUM_EXPERTS, PRESETS, SOFT_MOA_VARIANTS, VARIANTS


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: GeGLU's activation (Gemma's gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


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
_MOE = dict(moe_router_pre_softmax=MOE_ROUTER_PRE_SOFTMAX, **MOE_TRAINING_DEFAULTS)


def variant_config(
    variant: str,
    preset: Optional[str] = None,
    num_experts: int = DEFAULT_NUM_EXPERTS,
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
