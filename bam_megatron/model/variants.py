"""The names of things a model can be: variants, block types, norms, and the reference presets.

A leaf module (no torch, no megatron-core, no other project module), so that the flags, the
architecture, the builder and the remote-code export all spell them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VARIANTS = ("dense", "bam", "bam-shared-kv", "btx")
"""Model families (docs/model.md): the dense seed and experts; BAM with expert or shared K/V; BTX."""
SOFT_MOA_VARIANTS = ("bam", "bam-shared-kv")
"""Variants whose attention is a soft mixture of attention experts (with an attention router)."""
BLOCK_TYPES = ("parallel", "sequential")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
NORM_PLACEMENTS = ("pre", "post", "both")
"""Where the sequential block's norms are: before attention and FFN (Llama), after them (OLMo 2), or both (Gemma)."""
ACTIVATIONS = ("swiglu", "geglu")
"""The gated FFN's activation: SiLU (SwiGLU), or tanh-approximated GELU (GeGLU: Gemma's gelu_pytorch_tanh)."""
QK_NORM_SCOPES = ("head", "projection")
"""What the Q/K norms normalise: each head (Qwen3), or the whole projection, all heads together (OLMo 2)."""
DEFAULT_NUM_EXPERTS = 4
"""Experts of a mixture built from flags alone (no checkpoint, no --num-experts)."""


@dataclass(frozen=True)
class Preset:
    """Architecture sizes of a reference configuration (docs/design.md §5)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    untie_embeddings: bool

    def architecture_fields(self) -> dict[str, Any]:
        """The `Architecture` fields this preset sets (the vocabulary is the tokenizer's)."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "ffn_hidden_size": self.ffn_hidden_size,
            "untie_embeddings_and_output_weights": self.untie_embeddings,
        }


PRESETS = {
    "paper-590m": Preset(1024, 6, 8, 8, 2048, 256_000, untie_embeddings=True),
    "paper-2b": Preset(2304, 18, 18, 6, 9216, 256_000, untie_embeddings=False),
    "tiny": Preset(64, 2, 4, 2, 128, 512, untie_embeddings=True),
}
