"""A dense parallel-block model <-> transformers' ``CohereForCausalLM``, tensor for tensor.

Cohere's decoder layer is our block: ``y = x + Attn(LN(x)) + SwiGLU(LN(x))`` with one bias-free
LayerNorm, no linear biases, a final norm and (optionally tied) embeddings. What differs is notation:

- megatron-core fuses Q, K, V into ``linear_qkv`` (grouped per KV head: the group's query heads,
  then its key, then its value; `qkv_layout.split_qkv`) and gate/up into ``linear_fc1`` = [gate; up];
- RoPE pairs channel i with i + d/2 in megatron-core (rotate-half), but channels 2i and 2i+1 in
  Cohere (interleaved). Permuting each Q and K head's rows (``2i <- i``, ``2i+1 <- i + d/2``) makes
  Cohere's rotation of the permuted vector the permutation of ours; attention scores are dot
  products over all channels, so they are unchanged (up to summation order);
- Cohere multiplies logits by ``logit_scale``: exported as 1.0; on import it is folded into the
  final norm's weight (exact for powers of two, such as Cohere's 0.0625 and 0.125).

The table (`CohereTarget.mappings`, read both ways by `bridge`), per layer:

| transformers (``model.layers.N.``) | ours (``decoder.layers.N.``) | mapping |
|---|---|---|
| ``input_layernorm`` | ``input_layernorm`` (the one norm of the parallel block) | `Rename` |
| ``self_attn.{q,k,v}_proj`` | ``self_attention.linear_qkv`` | `QKV`, Q/K rows permuted per head (`rope_permutation`) |
| ``self_attn.o_proj`` | ``self_attention.linear_proj`` | `Rename` |
| ``mlp.{gate,up}_proj`` | ``mlp.linear_fc1`` = [gate; up] | `GateUp` |
| ``mlp.down_proj`` | ``mlp.linear_fc2`` | `Rename` |

plus the embeddings, with ``model.norm`` <-> ``decoder.final_layernorm`` `Scaled` by ``logit_scale``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from bam_megatron.conversion.hf.bridge import (
    LAYER,
    OURS,
    QKV,
    Mapping,
    Rename,
    TableImporter,
    TableTarget,
    embeddings,
    head_dim,
    swiglu,
)
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.target import common_checks, gemma_setting
from bam_megatron.model.architecture import Architecture

LAYERNORM_EPS = 1e-5  # transformers' default layer_norm_eps for Cohere
EXPORTED_LOGIT_SCALE = 1.0  # what an export's config.json says (the scale lives in the final norm)


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row ``p`` of a Cohere (interleaved-RoPE) head is row ``perm[p]`` of a megatron-core head."""
    p = torch.arange(head_dim)
    return p // 2 + (p % 2) * (head_dim // 2)


# ===== export: what CohereForCausalLM refuses, its config.json, and the table


def check_exportable(config, variant: str) -> None:
    """Refuse, naming the setting, anything CohereForCausalLM cannot compute exactly."""
    if variant != "dense":
        raise ConversionError(
            f"variant={variant}: CohereForCausalLM has no experts; export with --format bam "
            "(self-contained remote code)"
        )
    checks = [
        (
            "normalization",
            config.normalization,
            "LayerNorm",
            "Cohere's norm is a bias-free LayerNorm: train with --normalization LayerNorm, or export with --format bam",
        ),
        ("block_type", config.block_type, "parallel", "Cohere's block is the parallel one"),
        ("add_bias_linear", config.add_bias_linear, False, "Cohere's MLP has no biases"),
        ("gated_linear_unit", config.gated_linear_unit, True, "Cohere's MLP is SwiGLU"),
        ("activation_func", config.activation_func, F.silu, "Cohere's MLP is SwiGLU"),
        ("qk_layernorm", config.qk_layernorm, False, "export with --format bam"),
        ("rotary_interleaved", config.rotary_interleaved, False, "not supported"),
        (
            "kv_channels",
            config.kv_channels,
            config.hidden_size // config.num_attention_heads,
            "Cohere's head size is hidden_size / num_attention_heads",
        ),
        ("add_qkv_bias", config.add_qkv_bias, False, "Cohere's attention has no biases"),
        ("rope_scaling_factor", config.rope_scaling_factor, None, "not supported"),
    ]
    for name, value, wanted, hint in checks:
        if value != wanted:
            shown = getattr(value, "__name__", value)
            raise ConversionError(
                f"{name}={shown}: CohereForCausalLM needs {getattr(wanted, '__name__', wanted)} ({hint})"
            )


class CohereTarget(TableTarget):
    """``CohereForCausalLM``: the parallel block with one bias-free LayerNorm."""

    name = "cohere"
    architecture_class = "CohereForCausalLM"
    model_type = "cohere"

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """`check_exportable`'s checks; none of Gemma's settings."""
        gemma = gemma_setting(a)
        if gemma is not None:
            return f"{gemma}: CohereForCausalLM has no such setting"
        try:
            check_exportable(config, a.variant)
        except ConversionError as reason:
            return str(reason)
        return common_checks(config)

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """Cohere's config.json: logit_scale 1, no q/k norms, no biases."""
        return {
            **self.decoder_config(a, config, meta, token_ids),
            "layer_norm_eps": a.norm_epsilon,
            "logit_scale": EXPORTED_LOGIT_SCALE,
            "use_qk_norm": False,
            "attention_bias": False,
        }

    def mappings(self, a: Architecture, logit_scale: float = EXPORTED_LOGIT_SCALE, **options: Any) -> list[Mapping]:
        """Q and K rows permuted per head (interleaved RoPE), one norm per layer, ``logit_scale`` in the final norm."""
        theirs, ours = LAYER + "self_attn.", OURS + "self_attention."
        return [
            *embeddings(a, norm_factor=float(logit_scale)),
            Rename(LAYER + "input_layernorm.weight", OURS + "input_layernorm.weight"),
            QKV(
                tuple(f"{theirs}{x}_proj.weight" for x in "qkv"),
                ours + "linear_qkv.weight",
                heads=a.num_attention_heads,
                groups=a.num_query_groups,
                rows=rope_permutation(head_dim(a)),
            ),
            Rename(theirs + "o_proj.weight", ours + "linear_proj.weight"),
            *swiglu(LAYER + "mlp.", OURS + "mlp."),
        ]


# ===== import: config.json's checks (the table is the target's)


class CohereImporter(TableImporter):
    """``CohereForCausalLM`` (Command R and transformers' random Cohere models) -> a parallel-block seed.

    Q and K rows are permuted per head from Cohere's interleaved RoPE to megatron-core's halves;
    ``logit_scale`` is folded into the final norm's weight (exact for powers of two).
    """

    model_type = "cohere"
    architecture_class = "CohereForCausalLM"
    target = CohereTarget()
    defaults = {
        "use_qk_norm": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "layer_norm_eps": LAYERNORM_EPS,
        "tie_word_embeddings": True,
        "num_key_value_heads": None,
        "head_dim": None,
        "logit_scale": None,
        "initializer_range": 0.02,
    }

    def default_seq_length(self) -> int:
        """max_position_embeddings, else 4096."""
        return int(self.cfg.get("max_position_embeddings") or 4096)

    def check(self) -> Architecture:
        """Refuse, naming the field, a config.json that is not a Cohere model bam-megatron can hold."""
        for key, wanted in (("use_qk_norm", False), ("attention_bias", False), ("hidden_act", "silu")):
            if self.get(key) != wanted:
                raise ConversionError(f"{key}={self.get(key)}: bam-megatron's dense model needs {key}={wanted}")
        eps = self.get("layer_norm_eps")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConversionError(f"layer_norm_eps={eps}: must be a positive number")
        heads, hidden = self.get("num_attention_heads"), self.get("hidden_size")
        groups = self.get("num_key_value_heads") or heads
        if hidden % heads or heads % groups:
            raise ConversionError(
                f"num_attention_heads={heads}, num_key_value_heads={groups}, hidden_size={hidden}: "
                "heads must divide hidden_size and KV heads must divide heads"
            )
        if self.get("head_dim") not in (None, hidden // heads):
            raise ConversionError(
                f"head_dim={self.get('head_dim')}: bam-megatron's Cohere head size is hidden_size / num_attention_heads"
            )
        theta, _ = self.rope(allow_llama3=False)
        scale = self.get("logit_scale")
        if scale not in (None, 1, 1.0):
            self.notes.append(f"logit_scale={scale} folded into the final norm's weight")
        self.heads, self.kv_heads, self.head_dim = heads, groups, hidden // heads
        return Architecture(
            variant="dense",
            num_layers=self.get("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=self.get("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            untie_embeddings_and_output_weights=not self.get("tie_word_embeddings"),
            normalization="LayerNorm",
            norm_epsilon=float(eps),
            rotary_base=theta,
            padded_vocab_size=self.get("vocab_size"),
        )

    def record(self) -> dict[str, Any]:
        """logit_scale, which the import folds into the final norm (an export writes 1.0)."""
        return {"logit_scale": self.get("logit_scale")}

    def table_options(self) -> dict[str, Any]:
        """The logit scale the final norm takes on (None: 1)."""
        scale = self.get("logit_scale")
        return {"logit_scale": 1.0 if scale is None else float(scale)}
