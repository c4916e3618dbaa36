"""Phi-3 and Phi-4 (``Phi3ForCausalLM``) <-> a dense sequential-block model.

Phi-3's decoder is Llama's (``h = x + Attn(RMSNorm(x)); y = h + SwiGLU(RMSNorm(h))``, GQA,
rotate-half RoPE, no biases) with two tensors fused: ``qkv_proj`` is [Q; K; V] (all query heads,
then all key heads, then all value heads) and ``gate_up_proj`` is [gate; up], which is already
megatron-core's ``linear_fc1``. Its residual and embedding dropouts (``resid_pdrop``,
``embd_pdrop``) do nothing at inference and are ignored.

The table (`Phi3Target.mappings`: Llama's, `llama.LlamaTarget`, with these two entries), per layer:

| transformers (``model.layers.N.``) | ours (``decoder.layers.N.``) | mapping |
|---|---|---|
| ``self_attn.qkv_proj`` = [Q; K; V] | ``self_attention.linear_qkv`` (per KV group: Q heads, K, V) | `QKV` (one name) |
| ``mlp.gate_up_proj`` = [gate; up] | ``mlp.linear_fc1`` = [gate; up] | `Rename` |
| ``mlp.down_proj`` | ``mlp.linear_fc2`` | `Rename` |

the rest as Llama (norms, ``o_proj``, embeddings; tied or untied). Refused on import, naming the
field: ``partial_rotary_factor`` below 1 (Phi-4-mini: megatron-core here rotates every channel),
RoPE other than plain (``longrope``, and 4.x's ``su``/``yarn``: megatron-core computes no such
scaling), a ``sliding_window`` shorter than the recorded sequence (Phi-3-mini-4k's 2047: import
with ``--seq-length 2047``), ``hidden_act`` other than silu. Refused on export: what Llama
refuses, and any bias, q/k norm or Llama-3 RoPE scaling (Phi-3 has none of them).
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.bridge import LAYER, OURS, Mapping, Rename
from bam_megatron.conversion.hf.llama import _COMMON, LlamaImporter, LlamaTarget, sliding_window_refusal
from bam_megatron.model.architecture import Architecture

# ===== export: what Phi3ForCausalLM refuses, its config.json, and the table


class Phi3Target(LlamaTarget):
    """``Phi3ForCausalLM``: Llama's decoder with fused ``qkv_proj`` and ``gate_up_proj``; no biases."""

    name = "phi3"
    architecture_class = "Phi3ForCausalLM"
    model_type = "phi3"
    qkv_bias = "never"

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """As Llama without biases, and plain RoPE only."""
        reason = super().why_not(a, config)
        if reason is None and a.rope_scaling_factor is not None:
            reason = (
                f"rope_scaling_factor={a.rope_scaling_factor}: Phi3ForCausalLM has no Llama-3 RoPE scaling "
                "(export with --format llama)"
            )
        return reason

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window (full causal attention, as ours), no dropout."""
        return {"sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0}

    def qkv_names(self, kind: str) -> tuple[str, ...]:
        """One tensor: ``qkv_proj`` = [Q; K; V]."""
        return (f"{LAYER}self_attn.qkv_proj.{kind}",)

    def ffn(self, a: Architecture) -> list[Mapping]:
        """``gate_up_proj`` is megatron-core's ``linear_fc1`` as it is; ``down_proj``."""
        return [
            Rename(LAYER + "mlp.gate_up_proj.weight", OURS + "mlp.linear_fc1.weight"),
            Rename(LAYER + "mlp.down_proj.weight", OURS + "mlp.linear_fc2.weight"),
        ]


# ===== import: config.json's checks (the table is the target's)


class Phi3Importer(LlamaImporter):
    """``Phi3ForCausalLM`` (Phi-3, Phi-4): plain RoPE over whole heads only; a window that bites is refused."""

    model_type = "phi3"
    architecture_class = "Phi3ForCausalLM"
    target = Phi3Target()
    defaults = {
        **_COMMON,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
    }
    allow_llama3 = False

    def check_family(self) -> None:
        """No biases to read (Phi-3 has none); the sliding window exact only up to its length."""
        sliding_window_refusal(self.get("sliding_window"), self.seq_length)
