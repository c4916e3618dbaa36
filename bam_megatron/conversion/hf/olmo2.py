"""OLMo 2 (``Olmo2ForCausalLM``) <-> a dense sequential-block model with its norms after attention and FFN.

OLMo 2's decoder layer normalises the outputs of attention and MLP, inside the residual, and has no
norm before them: ``h = x + RMSNorm(Attn(x)); y = h + RMSNorm(SwiGLU(h))`` (``norm_placement:
post``). Its q/k RMSNorms normalise the whole projection, all heads together, before RoPE
(``qk_layernorm_scope: projection``: weights of size heads x head_dim and kv_heads x head_dim).
The rest is Llama's: GQA, rotate-half RoPE, a final RMSNorm, tied or untied embeddings;
``attention_bias`` (q/k/v and o_proj biases) as Llama's, the o_proj bias zeros.

The table (`Olmo2Target.mappings`: Llama's attention and FFN, `llama.LlamaTarget`), per layer:

| transformers (``model.layers.N.``) | ours (``decoder.layers.N.``) | mapping |
|---|---|---|
| ``self_attn.{q,k,v}_proj`` | ``self_attention.linear_qkv`` (per KV group) | `QKV` |
| ``self_attn.{q,k}_norm`` (whole projection) | ``self_attention.{q,k}_layernorm`` | `Rename` |
| ``self_attn.o_proj`` | ``self_attention.linear_proj`` | `Rename` |
| ``post_attention_layernorm`` | ``self_attn_bda.post_layernorm`` | `Rename` |
| ``mlp.{gate,up}_proj``, ``down_proj`` | ``mlp.linear_fc1`` = [gate; up], ``linear_fc2`` | `GateUp`, `Rename` |
| ``post_feedforward_layernorm`` | ``mlp_bda.post_layernorm`` | `Rename` |

Refused on export: what Llama refuses, and a model without OLMo 2's norm layout (pre-norms, or
per-head or no q/k norms). OLMo 3 (``olmo3``: sliding-window layers) is not read.
"""

from __future__ import annotations

from typing import Any

from bam_megatron.conversion.hf.bridge import LAYER, OURS, Mapping, Rename, embeddings
from bam_megatron.conversion.hf.llama import _COMMON, LlamaImporter, LlamaTarget
from bam_megatron.model.architecture import Architecture

# ===== export: what Olmo2ForCausalLM refuses, its config.json, and the table


class Olmo2Target(LlamaTarget):
    """``Olmo2ForCausalLM``: h = x + RMSNorm(Attn x); y = h + RMSNorm(SwiGLU h); q/k norms over the projection."""

    name = "olmo2"
    architecture_class = "Olmo2ForCausalLM"
    model_type = "olmo2"
    qk_norm = True
    norm_placement = "post"
    qk_norm_scope = "projection"

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """``attention_bias`` for q/k/v biases (with o_proj biases of zeros, as Llama's)."""
        return {"attention_bias": a.add_qkv_bias}

    def mappings(self, a: Architecture, **options: Any) -> list[Mapping]:
        """Embeddings; per layer the attention, its post-norm, the FFN and its post-norm."""
        return [
            *embeddings(a),
            *self.attention(a),
            Rename(LAYER + "post_attention_layernorm.weight", OURS + "self_attn_bda.post_layernorm.weight"),
            *self.ffn(a),
            Rename(LAYER + "post_feedforward_layernorm.weight", OURS + "mlp_bda.post_layernorm.weight"),
        ]


# ===== import: config.json's checks (the table is the target's)


class Olmo2Importer(LlamaImporter):
    """``Olmo2ForCausalLM``: Llama's settings, the norms after attention and MLP, q/k norms over the projection."""

    model_type = "olmo2"
    architecture_class = "Olmo2ForCausalLM"
    target = Olmo2Target()
    defaults = {
        **_COMMON,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
    }
    qk_norm = True

    def check_family(self) -> None:
        """``attention_bias``: q/k/v biases, and o_proj biases that must be zeros (as Llama's)."""
        self.qkv_bias = bool(self.get("attention_bias"))

    def check(self) -> Architecture:
        """Llama's checks; OLMo 2's norm layout."""
        return super().check().replace(norm_placement="post", qk_layernorm_scope="projection")
