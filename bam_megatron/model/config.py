"""`BAMConfig`: megatron-core's TransformerConfig plus the fields that describe a BAM model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from bam_megatron.errors import ConfigError
from bam_megatron.model.variants import BLOCK_TYPES

KV_MODES = ("expert", "shared")


@dataclass
class BAMConfig(TransformerConfig):
    """TransformerConfig fields for Branch-Attend-Mix (docs/design.md §1).

    ``num_attention_heads`` / ``num_query_groups`` stay per attention expert, as in the dense
    models the experts come from; the soft mixture of attention is built as one attention with
    ``num_attention_experts`` times as many heads.
    """

    num_attention_experts: int = 1
    """Attention experts N. 1 is plain (dense) attention."""

    attention_kv_mode: str = "expert"
    """'expert': per-expert Q, K, V, O. 'shared': per-expert Q and O, one K and V for all experts."""

    attention_router_topk: Optional[int] = None
    """None: soft MoA, every token to every attention expert. k: keep the k largest gates per
    token and renormalise (ablation)."""

    router_bias: bool = False
    """A trained per-expert bias on both routers (attention gates and FFN router): logits = W x + b.
    Only the routers: megatron-core's ``add_bias_linear`` stays off for every other linear."""

    block_type: str = "parallel"
    """'parallel': y = x + Attn(Norm(x)) + FFN(Norm(x)). 'sequential': the pre-norm block."""

    norm_placement: str = "pre"
    """'pre': the sequential block's norms before attention and FFN; 'post': after them, inside the
    residual (OLMo 2): h = x + Norm(Attn(x)), y = h + Norm(FFN(h)) (`norm.PostNormBiasDropoutAdd`)."""

    scale_embeddings: bool = False
    """The embeddings times sqrt(hidden_size) (Gemma's; a forward hook on GPTModel's embedding, `gpt.gpt_model`)."""

    attn_logit_softcapping: Optional[float] = None
    """Attention scores soft-capped, c·tanh(s/c), before the softmax (Gemma 2; `sdpa_attention.SDPAttention`)."""

    final_logit_softcapping: Optional[float] = None
    """Output logits soft-capped, c·tanh(z/c) (Gemma 2; a forward hook on GPTModel's output layer)."""

    local_rotary_base: Optional[float] = None
    """RoPE base of the local layers (Gemma 3): every layer whose number (1-based) is not a multiple of
    ``global_attention_every`` (`rope_cache.RotatedCacheSelfAttention.layer_rope`)."""

    global_attention_every: Optional[int] = None
    """With ``local_rotary_base``: layers N, 2N, ... keep ``rotary_base``."""

    qk_layernorm_scope: str = "head"
    """With ``qk_layernorm``: 'head', megatron-core's per-head norms; 'projection', one RMSNorm over
    the whole Q (and K) projection, all heads together (OLMo 2; `norm.ProjectionRMSNorm`)."""

    rotary_base: float = 10000.0
    """RoPE base (Hugging Face's ``rope_theta``); read by the GPTModel builder."""

    rope_scaling_factor: Optional[float] = None
    """Llama-3 RoPE scaling factor (megatron-core's ``rope_scaling``); None: plain RoPE. Read by the builder."""

    fuse_tp_reduction: bool = True
    """Parallel block with a dense FFN: sum attention and FFN partial outputs before a single
    tensor-parallel reduction (one all-reduce or reduce-scatter per layer instead of two)."""

    def __post_init__(self) -> None:
        # Our checks first, with the flag names; megatron-core's own (which only see one expert's
        # heads) after them.
        pp = self.pipeline_model_parallel_size
        if self.num_layers % pp:  # megatron-core would only assert
            raise ConfigError(f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
        n = self.num_attention_experts
        if n < 1:
            raise ConfigError(f"num_attention_experts must be >= 1, got {n}")
        if self.attention_kv_mode not in KV_MODES:
            raise ConfigError(f"attention_kv_mode must be one of {KV_MODES}, got {self.attention_kv_mode!r}")
        if self.block_type not in BLOCK_TYPES:
            raise ConfigError(f"block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        if self.norm_placement != "pre" and self.block_type != "sequential":
            raise ConfigError(f"--norm-placement {self.norm_placement} needs --block-type sequential")
        k = self.attention_router_topk
        if k is not None and not 1 <= k <= n:
            raise ConfigError(f"attention_router_topk must be in [1, num_attention_experts={n}], got {k}")
        tp = self.tensor_model_parallel_size
        if (n * self.num_attention_heads) % tp:
            raise ConfigError(
                f"{n} attention experts x {self.num_attention_heads} heads are not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        if self.attention_kv_groups % tp:
            raise ConfigError(
                f"{self.attention_kv_groups} KV groups ({self.attention_kv_mode} KV) are not "
                f"divisible by --tensor-model-parallel-size {tp}"
            )
        if self.router_bias and self.num_moe_experts is None:
            raise ConfigError("--router-bias: a dense model has no router (bam, bam-shared-kv and btx have)")
        if self.num_moe_experts is not None and self.num_moe_experts % self.expert_model_parallel_size:
            raise ConfigError(
                f"--num-experts {self.num_moe_experts} is not divisible by "
                f"--expert-model-parallel-size {self.expert_model_parallel_size}"
            )
        try:
            super().__post_init__()
        except ValueError as error:  # megatron-core's checks of the settings we pass on
            raise ConfigError(f"megatron-core refuses these model settings: {error}") from None

    @property
    def uses_soft_moa(self) -> bool:
        """Whether attention is a mixture (N > 1)."""
        return self.num_attention_experts > 1

    @property
    def attention_kv_groups(self) -> int:
        """KV groups of the one wide attention: N x H_kv (expert KV) or H_kv (shared KV)."""
        groups = self.num_query_groups or self.num_attention_heads
        return groups * (self.num_attention_experts if self.attention_kv_mode == "expert" else 1)
