"""Gemma 2 (``Gemma2ForCausalLM``) <-> a dense sequential-block model: Gemma 3's layer without q/k norms,
one RoPE base, with soft-capping.

Gemma 2's decoder is Gemma 3's (`gemma3`: (1 + w) RMSNorms before and after attention and MLP,
GeGLU, embeddings times sqrt(hidden_size), ``query_pre_attn_scalar``; the same table, without q/k
norms) with attention scores soft-capped before the softmax (``attn_logit_softcapping``:
c·tanh(s/c), `sdpa_attention.softcapped_attention`) and the output logits too
(``final_logit_softcapping``). Every other layer slides (``layer_types``), all at one RoPE base:
the attention is full causal, exact where the sequence fits the window; a shorter window is refused.
Refused on import: ``attention_bias``, bidirectional attention, RoPE other than plain.
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.gemma3 import KINDS, Gemma3Importer, Gemma3Target, check_layer_types
from bam_megatron.conversion.hf.llama import _COMMON, LlamaImporter
from bam_megatron.model.architecture import Architecture

# ===== export


class Gemma2Target(Gemma3Target):
    """``Gemma2ForCausalLM``: Gemma 3's layer without q/k norms or local RoPE base, with soft-capping."""

    name = "gemma2"
    architecture_class = "Gemma2ForCausalLM"
    model_type = "gemma2"
    qk_norm = False

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """Gemma's layer (Llama's checks), one RoPE base."""
        if a.local_rotary_base is not None:
            return (
                f"local_rotary_base={a.local_rotary_base}: Gemma2ForCausalLM has one RoPE base "
                "(export with --format gemma3_text)"
            )
        return super(Gemma3Target, self).why_not(a, config)

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """Gemma 3's fields with one ``rope_parameters`` and the soft-capping (null: none)."""
        out = super().hf_config(a, config, meta, token_ids)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(a.rotary_base)}
        out["attn_logit_softcapping"] = a.attn_logit_softcapping
        out["final_logit_softcapping"] = a.final_logit_softcapping
        # Gemma 2's alternation, its window as long as the recorded sequence (`Gemma3Target`): never bites
        out["layer_types"] = [KINDS[(i + 1) % 2 == 0] for i in range(a.num_layers)]
        return out


# ===== import


class Gemma2Importer(Gemma3Importer):
    """``Gemma2ForCausalLM``: Gemma's layer, soft-capping, every other layer sliding where the window never bites."""

    model_type = "gemma2"
    architecture_class = "Gemma2ForCausalLM"
    target = Gemma2Target()
    defaults = {
        **{k: v for k, v in _COMMON.items() if k != "hidden_act"},
        "hidden_activation": "gelu_pytorch_tanh",
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "layer_types": None,
        "attention_bias": False,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "use_bidirectional_attention": None,
    }
    qk_norm = False
    allow_llama3 = False

    def check_family(self) -> None:
        """No biases or bidirectional attention; windows only where they never bite."""
        self.require("attention_bias", False, "megatron-core's QKV bias has no o_proj bias")
        if self.get("use_bidirectional_attention"):
            raise ConversionError("use_bidirectional_attention=True: bam-megatron's attention is causal")
        check_layer_types(self, 2)
        self.every = None  # one RoPE base: local and global layers compute alike where the window fits

    rope = LlamaImporter.rope

    def check(self) -> Architecture:
        """Gemma's layer, no local RoPE base, the soft-capping."""
        a = super().check()
        caps = {key: self.get(key) for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        return a.replace(**{key: None if value is None else float(value) for key, value in caps.items()})
