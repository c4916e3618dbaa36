"""Llama and its close relatives (Mistral, Qwen2, Qwen3) -> a dense sequential-block seed.

These four are one decoder: ``h = x + Attn(RMSNorm(x)); y = h + SwiGLU(RMSNorm(h))`` with GQA,
rotate-half RoPE (as megatron-core's default: no Q/K row permutation, unlike Cohere's), a final
RMSNorm and tied or untied embeddings. They differ in a few settings, each an `Architecture` field:

| family | what differs | Architecture |
|---|---|---|
| Llama 2/3.x | ``rope_scaling`` ``llama3``; ``attention_bias`` (o_proj 0) | ``rope_scaling_factor``, ``add_qkv_bias`` |
| Mistral | ``sliding_window`` (refused where it would bite) | — |
| Qwen2 | biases on q/k/v | ``add_qkv_bias`` |
| Qwen3 | per-head RMSNorm on q and k; ``head_dim`` ≠ hidden/heads | ``qk_layernorm``, ``kv_channels`` |

Tensor mapping, per layer (``model.layers.N.`` -> ``decoder.layers.N.``):

| transformers | ours (megatron-core parameter names) |
|---|---|
| ``input_layernorm`` | ``input_layernorm`` |
| ``self_attn.{q,k,v}_proj.{weight,bias}`` | ``self_attention.linear_qkv.{weight,bias}`` (per KV group: Q heads, K, V) |
| ``self_attn.{q,k}_norm`` | ``self_attention.{q,k}_layernorm`` |
| ``self_attn.o_proj`` | ``self_attention.linear_proj`` |
| ``post_attention_layernorm`` | ``pre_mlp_layernorm`` |
| ``mlp.gate_proj``, ``mlp.up_proj`` | ``mlp.linear_fc1`` = [gate; up] |
| ``mlp.down_proj`` | ``mlp.linear_fc2`` |

plus ``model.embed_tokens``, ``model.norm``, ``lm_head`` -> ``embedding.word_embeddings``,
``decoder.final_layernorm``, ``output_layer``. The defaults are transformers 5.23's for a field
config.json leaves out (tests/conversion/hf/test_hf_import.py compares them with transformers' config classes).
"""

from __future__ import annotations

import torch

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.hf_files import SafetensorsWeights
from bam_megatron.conversion.hf.importer import (
    REQUIRED,
    TOP,
    Importer,
    attention_shapes,
    embedding_shapes,
    fill_qkv,
    swiglu_shapes,
)
from bam_megatron.model.architecture import Architecture

_SIZES = {key: REQUIRED for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
_COMMON = {
    **_SIZES,
    "num_attention_heads": REQUIRED,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
}


class LlamaImporter(Importer):
    """``LlamaForCausalLM`` (Llama 2, 3, 3.1-3.3: GQA, ``llama3`` RoPE scaling, tied or untied)."""

    model_type = "llama"
    architecture_class = "LlamaForCausalLM"
    defaults = {
        **_COMMON,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    }
    qkv_bias = False
    qk_norm = False
    output_bias = False  # o_proj.bias: read and required to be zero (megatron-core's attention has none)

    def check_family(self) -> None:
        """The settings of this family beyond the shared ones: ``attention_bias`` (q/k/v biases, and o_proj
        biases that must be zeros, as bam-convert-hf exports q/k/v biases to Llama)."""
        self.qkv_bias = self.output_bias = bool(self.get("attention_bias"))
        self.require("mlp_bias", False, "bam-megatron's MLP has no biases")

    def check(self) -> Architecture:
        """Check config.json; the seed's architecture (sequential block, RMSNorm, SwiGLU, RoPE)."""
        self.check_family()
        self.require("hidden_act", "silu", "the MLP is SwiGLU")
        eps = self.get("rms_norm_eps")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConversionError(f"rms_norm_eps={eps}: must be a positive number")
        hidden, heads = self.get("hidden_size"), self.get("num_attention_heads")
        groups = self.groups()
        head_dim = self.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConversionError(
                    f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} and head_dim is not given"
                )
            head_dim = hidden // heads
        if not isinstance(head_dim, int) or head_dim < 1 or head_dim % 2:
            raise ConversionError(f"head_dim={head_dim}: must be a positive even integer (RoPE rotates pairs)")
        theta, scaling = self.rope()
        self.head_dim, self.heads, self.kv_heads = head_dim, heads, groups
        return Architecture(
            num_layers=self.get("num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups,
            padded_vocab_size=self.get("vocab_size"),
            block_type="sequential",
            normalization="RMSNorm",
            rotary_base=theta,
            untie_embeddings_and_output_weights=not self.get("tie_word_embeddings"),
            kv_channels=None if head_dim * heads == hidden else head_dim,
            norm_epsilon=float(eps),
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
            rope_scaling_factor=scaling,
            **self.ffn_fields(),
        )

    def ffn_fields(self) -> dict:
        """The Architecture fields of the FFN: a dense SwiGLU of ``intermediate_size``."""
        return {"variant": "dense", "ffn_hidden_size": self.get("intermediate_size")}

    # ----- tensors
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the transformers model, by name, with its shape."""
        a = self.architecture
        vocab, hidden = a.padded_vocab_size, a.hidden_size
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = embedding_shapes(vocab, hidden, a.untie_embeddings_and_output_weights)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            shapes.update(attention_shapes(p, hidden, q, kv))
            shapes.update({p + "post_attention_layernorm.weight": (hidden,), **self.ffn_shapes(i)})
            if self.qkv_bias:
                shapes.update(
                    {
                        p + "self_attn.q_proj.bias": (q,),
                        p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,),
                    }
                )
            if self.output_bias:
                shapes[p + "self_attn.o_proj.bias"] = (hidden,)
            if self.qk_norm:
                shapes.update(
                    {p + "self_attn.q_norm.weight": (self.head_dim,), p + "self_attn.k_norm.weight": (self.head_dim,)}
                )
        return shapes

    def ffn_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """The FFN tensors of layer ``i``: ``mlp.{gate,up,down}_proj``."""
        a = self.architecture
        return swiglu_shapes(f"model.layers.{i}.mlp.", a.hidden_size, a.ffn_hidden_size)

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """A tied model's checkpoint may store lm_head.weight too (it must equal the embedding)."""
        a = self.architecture
        return {} if a.untie_embeddings_and_output_weights else {"lm_head.weight": (a.padded_vocab_size, a.hidden_size)}

    def check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """As every family; with ``attention_bias``, a missing bias names the setting."""
        if self.output_bias:
            for name in self.tensor_shapes():
                if name.endswith("_proj.bias") and name not in shapes:
                    raise ConversionError(f"attention_bias=True but tensor {name} is missing from the checkpoint")
        super().check_tensors(shapes)

    def fill(self, unit: int, params: dict[str, torch.Tensor], source: SafetensorsWeights) -> None:
        """Write one unit of our model (TOP: embedding, final norm, output layer; else layer ``unit``)."""
        read = source.read
        if unit == TOP:
            embedding = params["embedding.word_embeddings.weight"]
            embedding.copy_(read("model.embed_tokens.weight"))
            params["decoder.final_layernorm.weight"].copy_(read("model.norm.weight"))
            if self.architecture.untie_embeddings_and_output_weights:
                params["output_layer.weight"].copy_(read("lm_head.weight"))
            elif "lm_head.weight" in source and not torch.equal(read("lm_head.weight").float(), embedding):
                raise ConversionError(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                )
            return
        theirs, ours = f"model.layers.{unit}.self_attn.", f"decoder.layers.{unit}.self_attention."
        for kind in ("weight", "bias") if self.qkv_bias else ("weight",):
            fill_qkv(
                params[f"{ours}linear_qkv.{kind}"],
                *(read(f"{theirs}{x}_proj.{kind}") for x in "qkv"),
                self.heads,
                self.kv_heads,
            )
        if self.qk_norm:
            params[ours + "q_layernorm.weight"].copy_(read(theirs + "q_norm.weight"))
            params[ours + "k_layernorm.weight"].copy_(read(theirs + "k_norm.weight"))
        params[ours + "linear_proj.weight"].copy_(read(theirs + "o_proj.weight"))
        if self.output_bias and bool(read(theirs + "o_proj.bias").count_nonzero()):
            raise ConversionError(
                f"attention_bias=True: tensor {theirs}o_proj.bias is not zero (megatron-core's attention output "
                "projection has no bias; its q/k/v biases are add_qkv_bias)"
            )
        theirs, ours = f"model.layers.{unit}.", f"decoder.layers.{unit}."
        params[ours + "input_layernorm.weight"].copy_(read(theirs + "input_layernorm.weight"))
        params[ours + "pre_mlp_layernorm.weight"].copy_(read(theirs + "post_attention_layernorm.weight"))
        self.fill_ffn(unit, params, read)

    def fill_ffn(self, i: int, params: dict[str, torch.Tensor], read) -> None:
        """Layer ``i``'s FFN: ``linear_fc1`` = [gate; up], ``linear_fc2`` = down."""
        fill_swiglu(
            params, f"decoder.layers.{i}.mlp.", read, f"model.layers.{i}.mlp.", self.architecture.ffn_hidden_size
        )


def fill_swiglu(
    params: dict, ours: str, read, theirs: str, ffn: int, names=("gate_proj", "up_proj", "down_proj")
) -> None:
    """megatron-core's gated MLP ``ours`` (``linear_fc1`` = [gate; up], ``linear_fc2``) from three projections."""
    fc1 = params[ours + "linear_fc1.weight"]
    fc1[:ffn].copy_(read(f"{theirs}{names[0]}.weight"))
    fc1[ffn:].copy_(read(f"{theirs}{names[1]}.weight"))
    params[ours + "linear_fc2.weight"].copy_(read(f"{theirs}{names[2]}.weight"))


class MistralImporter(LlamaImporter):
    """``MistralForCausalLM``: Llama's decoder; a ``sliding_window`` shorter than the sequence is refused."""

    model_type = "mistral"
    architecture_class = "MistralForCausalLM"
    defaults = {
        **_COMMON,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    }

    def check_family(self) -> None:
        """Sliding-window attention: exact (the window never bites) only up to the window's length."""
        window = self.get("sliding_window")
        if window is not None and window < self.seq_length:
            raise ConversionError(
                f"sliding_window={window}: each token attends to the last {window} only, bam-megatron's "
                f"attention is full causal; exact for sequences up to {window} tokens: import with "
                f"--seq-length {window} (the recorded length is {self.seq_length})"
            )


class Qwen2Importer(LlamaImporter):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5): biases on q/k/v; a sliding window that bites is refused."""

    model_type = "qwen2"
    architecture_class = "Qwen2ForCausalLM"
    defaults = {
        **_COMMON,
        "num_key_value_heads": 32,
        "head_dim": None,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
    }
    qkv_bias = True

    def check_family(self) -> None:
        """Qwen's per-layer sliding window (``use_sliding_window``, ``max_window_layers``, ``layer_types``)."""
        layers = self.get("num_hidden_layers")
        window = self.get("sliding_window") if self.get("use_sliding_window") else None
        types = self.get("layer_types")
        if types is None:
            types = self.derived_layer_types(window, layers)
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown or len(types) != layers:
            raise ConversionError(f"layer_types={types}: expected {layers} of full_attention or sliding_attention")
        sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        if window is not None and sliding and window < self.seq_length:
            raise ConversionError(
                f"use_sliding_window=true: layers {sliding[0]}-{sliding[-1]} attend to the last "
                f"sliding_window={window} tokens only, bam-megatron's attention is full causal; exact for "
                f"sequences up to {window} tokens: import with --seq-length {window} (the recorded length is "
                f"{self.seq_length})"
            )

    def derived_layer_types(self, window, layers: int) -> list[str]:
        """transformers' layer_types when config.json gives none: sliding from ``max_window_layers`` on."""
        start = self.get("max_window_layers")
        return ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(layers)]


class Qwen3Importer(Qwen2Importer):
    """``Qwen3ForCausalLM``: per-head RMSNorm on q and k, ``head_dim`` (default 128) free of hidden/heads."""

    model_type = "qwen3"
    architecture_class = "Qwen3ForCausalLM"
    defaults = {**Qwen2Importer.defaults, "head_dim": 128, "attention_bias": False}
    qkv_bias = False
    qk_norm = True

    def check_family(self) -> None:
        """No biases (Qwen3's attention_bias would add an o_proj bias too); Qwen's sliding window."""
        self.require("attention_bias", False, "biases on q/k/v and o_proj; megatron-core's QKV bias has no o_proj bias")
        super().check_family()
