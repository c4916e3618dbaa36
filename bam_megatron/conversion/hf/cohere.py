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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.hf_files import SafetensorsWeights
from bam_megatron.conversion.hf.importer import (
    TOP,
    Importer,
    attention_shapes,
    embedding_shapes,
    fill_qkv,
    swiglu_shapes,
)
from bam_megatron.model.architecture import Architecture

LAYERNORM_EPS = 1e-5  # transformers' default layer_norm_eps for Cohere


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row ``p`` of a Cohere (interleaved-RoPE) head is row ``perm[p]`` of a megatron-core head."""
    p = torch.arange(head_dim)
    return p // 2 + (p % 2) * (head_dim // 2)


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


class CohereImporter(Importer):
    """``CohereForCausalLM`` (Command R and transformers' random Cohere models) -> a parallel-block seed.

    Q and K rows are permuted per head from Cohere's interleaved RoPE to megatron-core's halves;
    ``logit_scale`` is folded into the final norm's weight (exact for powers of two).
    """

    model_type = "cohere"
    architecture_class = "CohereForCausalLM"
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

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the transformers model, by name, with its shape."""
        a = self.architecture
        vocab, hidden, ffn = a.padded_vocab_size, a.hidden_size, a.ffn_hidden_size
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = embedding_shapes(vocab, hidden, a.untie_embeddings_and_output_weights)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            shapes.update(attention_shapes(p, hidden, q, kv))
            shapes.update(swiglu_shapes(p + "mlp.", hidden, ffn))
        return shapes

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """Some tied checkpoints store lm_head.weight too (it must equal the embedding)."""
        a = self.architecture
        return {} if a.untie_embeddings_and_output_weights else {"lm_head.weight": (a.padded_vocab_size, a.hidden_size)}

    def fill(self, unit: int, params: dict[str, torch.Tensor], source: SafetensorsWeights) -> None:
        """Write one unit of our model from the Cohere tensors (Q/K rows permuted, logit_scale folded)."""
        read = source.read
        if unit == TOP:
            embedding = params["embedding.word_embeddings.weight"]
            embedding.copy_(read("model.embed_tokens.weight"))
            final_norm = params["decoder.final_layernorm.weight"]
            final_norm.copy_(read("model.norm.weight"))
            scale = self.get("logit_scale")
            final_norm.mul_(1.0 if scale is None else float(scale))
            if self.architecture.untie_embeddings_and_output_weights:
                params["output_layer.weight"].copy_(read("lm_head.weight"))
            elif "lm_head.weight" in source and not torch.equal(read("lm_head.weight").float(), embedding):
                raise ConversionError(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                )
            return
        d, hidden = self.head_dim, self.architecture.hidden_size
        inverse = torch.argsort(rope_permutation(d))  # Cohere rows -> megatron-core rows
        theirs, ours = f"model.layers.{unit}.", f"decoder.layers.{unit}."
        q = read(theirs + "self_attn.q_proj.weight").view(self.heads, d, hidden)[:, inverse]
        k = read(theirs + "self_attn.k_proj.weight").view(self.kv_heads, d, hidden)[:, inverse]
        fill_qkv(
            params[ours + "self_attention.linear_qkv.weight"],
            q,
            k,
            read(theirs + "self_attn.v_proj.weight"),
            self.heads,
            self.kv_heads,
        )
        params[ours + "self_attention.linear_proj.weight"].copy_(read(theirs + "self_attn.o_proj.weight"))
        params[ours + "input_layernorm.weight"].copy_(read(theirs + "input_layernorm.weight"))
        fc1, ffn = params[ours + "mlp.linear_fc1.weight"], self.architecture.ffn_hidden_size
        fc1[:ffn].copy_(read(theirs + "mlp.gate_proj.weight"))
        fc1[ffn:].copy_(read(theirs + "mlp.up_proj.weight"))
        params[ours + "mlp.linear_fc2.weight"].copy_(read(theirs + "mlp.down_proj.weight"))
