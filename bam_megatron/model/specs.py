"""Layer specs for every model this project builds, in megatron-core's ModuleSpec form.

One function, `get_bam_layer_spec`, covers dense, BAM, BAM shared-KV and BTX layers, in the
parallel or sequential block, with the local (pure PyTorch) or Transformer Engine backend. The
backend is picked automatically: Transformer Engine when importable on a GPU, local otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from bam_megatron.errors import ConfigError
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.gpt import block_spec
from bam_megatron.model.norm import PostNormBiasDropoutAdd, ProjectionRMSNorm, TorchNorm
from bam_megatron.model.parallel_block import ParallelTransformerLayer, PartialSumRowParallelLinear
from bam_megatron.model.rope_cache import RotatedCacheSelfAttention
from bam_megatron.model.router import BiasedTopKRouter
from bam_megatron.model.sdpa_attention import SDPAttention
from bam_megatron.model.soft_moa import (
    ExpertHeadNorm,
    SoftMoASelfAttention,
    SoftMoASelfAttentionSubmodules,
    head_to_expert,
    kv_group_to_expert,
)

BACKENDS = ("auto", "local", "te")


def transformer_engine_usable() -> bool:
    """Transformer Engine is importable and there is a GPU to run it on."""
    if not torch.cuda.is_available():
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> 'te' where Transformer Engine can run, else 'local'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if transformer_engine_usable() else "local"
    if backend == "te" and not transformer_engine_usable():
        raise ConfigError("backend 'te' needs Transformer Engine and a CUDA GPU")
    return backend


def _modules(backend: str) -> dict:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return dict(
            norm=TENorm,
            column=TEColumnParallelLinear,
            row=TERowParallelLinear,
            core_attention=TEDotProductAttention,
            provider=TESpecProvider(),
        )
    return dict(
        norm=TorchNorm,
        column=ColumnParallelLinear,
        row=RowParallelLinear,
        core_attention=SDPAttention,
        provider=LocalSpecProvider(),
    )


def _norm(config: BAMConfig, backend: str) -> type:
    # Transformer Engine's LayerNorm always has a bias; ours has none (one checkpoint format for both backends).
    return TorchNorm if config.normalization == "LayerNorm" else _modules(backend)["norm"]


def get_bam_layer_spec(config: BAMConfig, backend: str = "auto") -> ModuleSpec:
    """The transformer layer described by ``config``.

    - attention: soft MoA (``num_attention_experts > 1``; per-expert Q/K norms: `ExpertHeadNorm`)
      or megatron-core's SelfAttention, both caching keys after RoPE when decoding (`rope_cache`);
    - FFN: megatron-core's MoELayer (``num_moe_experts``) or a dense SwiGLU/GELU MLP;
    - block: `ParallelTransformerLayer` or megatron-core's sequential TransformerLayer.
      A parallel block with a dense FFN reduces once over TP (`PartialSumRowParallelLinear`;
      these output GEMMs are plain PyTorch on either backend).
    """
    if config.attn_logit_softcapping is not None and resolve_backend(backend) == "te":
        raise ConfigError("--attn-logit-softcapping: computed by the local backend's attention only (--backend local)")
    m = _modules(resolve_backend(backend))
    norm = _norm(config, resolve_backend(backend))
    parallel = config.block_type == "parallel"
    dense_ffn = config.num_moe_experts is None
    fused = parallel and dense_ffn and config.fuse_tp_reduction
    output_linear = PartialSumRowParallelLinear if fused else m["row"]

    q_norm, k_norm = _qk_norms(config, norm)
    if config.uses_soft_moa:
        attention = ModuleSpec(
            module=SoftMoASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SoftMoASelfAttentionSubmodules(
                linear_qkv=m["column"],
                core_attention=m["core_attention"],
                linear_proj=output_linear,
                q_layernorm=q_norm,
                k_layernorm=k_norm,
            ),
        )
    else:
        attention = ModuleSpec(
            module=RotatedCacheSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=m["column"],
                core_attention=m["core_attention"],
                linear_proj=output_linear,
                q_layernorm=q_norm or IdentityOp,
                k_layernorm=k_norm or IdentityOp,
            ),
        )

    if dense_ffn:
        ffn = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=m["column"], linear_fc2=output_linear))
    else:
        ffn = get_moe_module_spec_for_backend(m["provider"], num_experts=config.num_moe_experts)
        if config.router_bias:  # the FFN router's own bias, without add_bias_linear on every linear
            ffn.submodules.router = BiasedTopKRouter

    pre_norm = IdentityOp if config.norm_placement == "post" else norm  # OLMo 2: no norm before
    bda = get_bias_dropout_add
    if config.norm_placement != "pre":  # OLMo 2, Gemma: a norm after attention and FFN, where they meet the residual
        bda = ModuleSpec(module=PostNormBiasDropoutAdd, params={"config": config, "norm": norm})
    return ModuleSpec(
        module=ParallelTransformerLayer if parallel else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=attention,
            self_attn_bda=bda,
            pre_mlp_layernorm=IdentityOp if parallel else pre_norm,
            mlp=ffn,
            mlp_bda=bda,
            sharded_state_dict_keys_map={} if parallel else sequential_norm_keys(dense_ffn),
        ),
    )


def _qk_norms(config: BAMConfig, norm: type) -> tuple[Optional[ModuleSpec], Optional[ModuleSpec]]:
    """The Q and K norms (None: none). Per head: megatron-core's norm, or with soft MoA each expert's
    own Q norm (`ExpertHeadNorm`; K too unless K is shared). Over the whole projection (OLMo 2):
    `ProjectionRMSNorm` over all heads, or with soft MoA over each expert's heads (shared K: all)."""
    if not config.qk_layernorm:
        return None, None
    moa, expert_kv = config.uses_soft_moa, config.attention_kv_mode == "expert"
    if config.qk_layernorm_scope == "projection":
        heads = tuple(head_to_expert(config).tolist()) if moa else (0,) * config.num_attention_heads
        groups = tuple(kv_group_to_expert(config).tolist()) if moa and expert_kv else (0,) * config.attention_kv_groups
        return tuple(ModuleSpec(module=ProjectionRMSNorm, params={"head_group": g}) for g in (heads, groups))
    if not moa:
        return norm, norm
    q_norm = ModuleSpec(module=ExpertHeadNorm, params={"head_expert": tuple(head_to_expert(config).tolist())})
    k_norm = norm
    if expert_kv:
        k_norm = ModuleSpec(module=ExpertHeadNorm, params={"head_expert": tuple(kv_group_to_expert(config).tolist())})
    return q_norm, k_norm


def sequential_norm_keys(dense_ffn: bool) -> dict[str, str]:
    """Where the sequential block's norms are stored: under megatron-core's names, so the same
    weights are the same keys in our checkpoints and Megatron-LM's.

    megatron-core's specs name a norm after the Transformer Engine linear it is fused into
    (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``); in front
    of MoE experts there is no fused linear, and the TE MoE spec keeps ``pre_mlp_layernorm``.
    """
    keys = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if dense_ffn:
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return keys


def get_bam_block_spec(config: BAMConfig, backend: str = "auto") -> ModuleSpec:
    """This pipeline stage's layers plus the final norm."""
    backend = resolve_backend(backend)
    return block_spec(config, get_bam_layer_spec(config, backend), final_norm=_norm(config, backend))
