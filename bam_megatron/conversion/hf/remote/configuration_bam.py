"""Configuration of a bam-megatron model exported for Hugging Face transformers (remote code).

Written by ``bam-convert-hf export --format bam``; self-contained (torch + transformers only).
One class describes every variant bam-megatron trains, with either block:

- ``dense``: one attention, dense SwiGLU FFN;
- ``btx``: one attention, ``num_experts`` top-k FFN experts;
- ``bam``: soft mixture of ``num_attention_experts`` attentions (expert K/V) + FFN experts;
- ``bam-shared-kv``: as ``bam`` with one K/V shared by all attention experts;
- ``block_type``: ``parallel`` (y = x + Attn(Norm x) + FFN(Norm x)) or ``sequential``
  (x' = x + Attn(Norm1 x); y = x' + FFN(Norm2 x')); ``norm_placement`` ``post`` (sequential only,
  OLMo 2's): x' = x + Norm1(Attn x); y = x' + Norm2(FFN x').
"""

from transformers import PretrainedConfig

VARIANTS = ("dense", "btx", "bam", "bam-shared-kv")
BLOCK_TYPES = ("parallel", "sequential")
NORM_PLACEMENTS = ("pre", "post", "both")
QK_NORM_SCOPES = ("head", "projection")


class BamConfig(PretrainedConfig):
    """Sizes and routing settings of a BAM / BTX / dense model, parallel or sequential block.

    The soft mixture of ``num_attention_experts`` (N) attentions is one attention module, and
    ``num_attention_heads`` / ``num_key_value_heads`` are its head counts, as transformers and serving
    stacks read them (cache sizes, attention kernels): N·H query heads and N·H_kv K/V heads (expert
    K/V) or H_kv (shared K/V), of ``head_dim`` channels, in megatron-core's order (see
    ``head_experts``). Each expert's own counts (as in the dense models the experts came from) are
    ``attention_heads_per_expert`` (H) and ``key_value_heads_per_expert`` (H_kv). A config without
    them (written before they existed, or built by hand) gives per-expert counts in
    ``num_attention_heads`` / ``num_key_value_heads``; they are widened here.
    ``qkv_bias``: biases on q/k/v (Qwen2's); ``qk_norm``: a norm of q
    and k before RoPE, per head (Qwen3's) or, ``qk_norm_scope`` ``projection``, over each expert's
    whole projection (OLMo 2's). ``norm_placement``: ``pre``, ``post`` (the sequential block's
    norms after attention and FFN, OLMo 2's) or ``both`` (Gemma's). Gemma's layer besides:
    ``apply_layernorm_1p`` ((1 + weight) norms), ``activation`` ``geglu`` (tanh GELU),
    ``scale_embeddings`` (times sqrt(hidden_size)), ``query_pre_attn_scalar`` (scores times its
    ^-1/2), ``attn_logit_softcapping`` / ``final_logit_softcapping`` (Gemma 2's c·tanh(x/c) of the
    attention scores / output logits), ``local_rotary_base`` with ``global_attention_every`` (every
    layer but each N-th rotates at the local base). ``rope_scaling_factor``: Llama-3's RoPE scaling as megatron-core
    computes it (low/high frequency factors 1 and 4, original context 8192).
    ``moe_router_topk_scaling_factor`` multiplies the FFN routing weights. ``router_bias``: both
    routers add a per-expert bias; ``router_expert_groups``: sizes of the groups of experts whose
    router rows are one GEMM each (a grown mixture's; None: one GEMM).
    """

    model_type = "bam_megatron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        variant="dense",
        block_type="parallel",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=None,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        num_attention_experts=1,
        attention_kv_mode="expert",
        attention_heads_per_expert=None,
        key_value_heads_per_expert=None,
        attention_router_topk=None,
        qkv_bias=False,
        qk_norm=False,
        qk_norm_scope="head",
        norm_placement="pre",
        apply_layernorm_1p=False,
        activation="swiglu",
        scale_embeddings=False,
        query_pre_attn_scalar=None,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        local_rotary_base=None,
        global_attention_every=None,
        num_experts=0,
        num_experts_per_tok=1,
        moe_router_pre_softmax=True,
        moe_router_topk_scaling_factor=None,
        router_bias=False,
        router_expert_groups=None,
        normalization="RMSNorm",
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling_factor=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        if normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be RMSNorm or LayerNorm, got {normalization!r}")
        if norm_placement not in NORM_PLACEMENTS or (norm_placement != "pre" and block_type != "sequential"):
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS} (not 'pre': sequential block only)")
        if activation not in ("swiglu", "geglu"):
            raise ValueError(f"activation must be swiglu or geglu, got {activation!r}")
        if qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope must be one of {QK_NORM_SCOPES}, got {qk_norm_scope!r}")
        if attention_kv_mode not in ("expert", "shared"):
            raise ValueError(f"attention_kv_mode must be 'expert' or 'shared', got {attention_kv_mode!r}")
        self.variant = variant
        self.block_type = block_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.num_hidden_layers = num_hidden_layers
        if attention_heads_per_expert is None:  # per-expert counts in the standard fields: widen them
            attention_heads_per_expert = num_attention_heads
            key_value_heads_per_expert = num_key_value_heads or num_attention_heads
            num_attention_heads = num_attention_experts * attention_heads_per_expert
            kv_experts = num_attention_experts if attention_kv_mode == "expert" else 1
            num_key_value_heads = kv_experts * key_value_heads_per_expert
        self.attention_heads_per_expert = attention_heads_per_expert
        self.key_value_heads_per_expert = key_value_heads_per_expert or attention_heads_per_expert
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // attention_heads_per_expert
        self.num_attention_experts = num_attention_experts
        self.attention_kv_mode = attention_kv_mode
        self.attention_router_topk = attention_router_topk
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.qk_norm_scope = qk_norm_scope
        self.norm_placement = norm_placement
        self.apply_layernorm_1p = apply_layernorm_1p
        self.activation = activation
        self.scale_embeddings = scale_embeddings
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        self.local_rotary_base = local_rotary_base
        self.global_attention_every = global_attention_every
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.router_bias = router_bias
        self.router_expert_groups = list(router_expert_groups) if router_expert_groups else None
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling_factor = rope_scaling_factor
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def attention_kv_groups(self):
        """K/V heads of the one wide attention: N x H_kv (expert K/V) or H_kv (shared K/V)."""
        return self.num_key_value_heads

    def head_experts(self):
        """The attention expert of each of the N x H query heads, in the wide attention's order.

        Expert K/V: expert-major (head i belongs to expert i // H). Shared K/V: K/V-group-major;
        within group g, each expert in turn contributes its H / H_kv heads of that group.
        """
        n, heads, groups = self.num_attention_experts, self.attention_heads_per_expert, self.key_value_heads_per_expert
        if self.attention_kv_mode == "expert":
            return [i // heads for i in range(n * heads)]
        per_group, per_expert_group = n * heads // groups, heads // groups
        return [(i % per_group) // per_expert_group for i in range(n * heads)]
