"""Configuration of a bam-megatron model exported for Hugging Face transformers (remote code).

Written by ``bam-convert-hf export --format bam``; self-contained (torch + transformers only).
One class describes every variant bam-megatron trains:

- ``dense``: one attention, dense SwiGLU FFN;
- ``btx``: one attention, ``num_experts`` top-k FFN experts;
- ``bam``: soft mixture of ``num_attention_experts`` attentions (expert K/V) + FFN experts;
- ``bam-shared-kv``: as ``bam`` with one K/V shared by all attention experts.
"""

from transformers import PretrainedConfig

VARIANTS = ("dense", "btx", "bam", "bam-shared-kv")


class BamConfig(PretrainedConfig):
    """Sizes and routing settings of a parallel-block (shared pre-norm) BAM / BTX / dense model.

    Attention sizes are per attention expert (as in the dense models the experts came from):
    ``num_attention_heads`` query heads and ``num_key_value_heads`` K/V heads each. The soft
    mixture is one attention with ``num_attention_experts * num_attention_heads`` query heads in
    megatron-core's order (see ``head_experts``).
    """

    model_type = "bam_megatron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        variant="dense",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=None,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        num_attention_experts=1,
        attention_kv_mode="expert",
        attention_router_topk=None,
        num_experts=0,
        num_experts_per_tok=1,
        moe_router_pre_softmax=True,
        normalization="RMSNorm",
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be RMSNorm or LayerNorm, got {normalization!r}")
        if attention_kv_mode not in ("expert", "shared"):
            raise ValueError(f"attention_kv_mode must be 'expert' or 'shared', got {attention_kv_mode!r}")
        self.variant = variant
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.num_attention_experts = num_attention_experts
        self.attention_kv_mode = attention_kv_mode
        self.attention_router_topk = attention_router_topk
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_kv_groups(self):
        """K/V heads of the one wide attention: N x H_kv (expert K/V) or H_kv (shared K/V)."""
        experts = self.num_attention_experts if self.attention_kv_mode == "expert" else 1
        return self.num_key_value_heads * experts

    def head_experts(self):
        """The attention expert of each of the N x H query heads, in the wide attention's order.

        Expert K/V: expert-major (head i belongs to expert i // H). Shared K/V: K/V-group-major;
        within group g, each expert in turn contributes its H / H_kv heads of that group.
        """
        n, heads, groups = self.num_attention_experts, self.num_attention_heads, self.num_key_value_heads
        if self.attention_kv_mode == "expert":
            return [i // heads for i in range(n * heads)]
        per_group, per_expert_group = n * heads // groups, heads // groups
        return [(i % per_group) // per_expert_group for i in range(n * heads)]
